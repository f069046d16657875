"""Training on DeepSpeed: process groups and engines (`engine`), the shared loop (`loop`),
checkpoints and exports (`checkpoint`), and the tasks (`pretrain`, `finetune_seg`, `finetune_ground`)."""
