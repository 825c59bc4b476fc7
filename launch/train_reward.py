#!/usr/bin/env python
"""Train a reward model: rm-train as a script. Works under `deepspeed`, `torchrun`, srun, or plain `python`
(one process).

    deepspeed --num_gpus 8 launch/train_reward.py --ds_config ds_configs/zero3.json \
        --model /ckpt/sft --data pairs.jsonl --output_dir out/rm
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rm_trainer.cli.train import entry  # noqa: E402

if __name__ == "__main__":
    entry(sys.argv[1:])
