"""Values shared across layers (config, models, data, training). Imports nothing of the package."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the statistics RepDistiller's and mdistiller's CIFAR-100 models were trained with (their dataset/cifar100.py)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

# the column a cached or pipeline teacher's embeddings travel in, beside image, label and index
TEACHER_EMB = "teacher_emb"

# The largest image decoded (pixels): a small file can expand to gigabytes (a 10000×10000 PNG is ~300 KB).
# ``ega-ray prepare --max-pixels`` refuses larger ones when a dataset is converted; this guards the readers.
MAX_PIXELS = 50_000_000

# how often a local Ray's Ray Train controller polls its workers (Ray's default: 2 s); docs/performance.md
LOCAL_HEALTH_CHECK_INTERVAL_S = 0.25

# the CPUs each task of the run's Ray Data stages asks for (reading, decoding, label masking, the cached mode's
# lookup): a fraction, so that they run beside the training workers on nodes those leave less than a whole CPU
# (e.g. 1.5 of 2 per host): every epoch's reads when the splits are not materialized, and, after a lost node,
# the rebuilding of the materialized blocks it held; at Ray Data's default of 1 CPU both wait forever
DATA_STAGE_CPUS = 0.25
