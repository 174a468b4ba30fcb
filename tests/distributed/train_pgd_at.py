"""Run by tests/test_defenses_distributed.py under `torchrun --nproc_per_node 2`: a short PGD-AT run
whose rank 0 writes the final weights and history, to be compared with a one-process run."""

from __future__ import annotations

import json
import sys

import torch

from robustlab.data import Dataset, digits_split
from robustlab.defenses import adversarial_training
from robustlab.training import seeded_init
from robustlab.zoo import DigitsCNN


def small_split(split: str, n: int) -> Dataset:
    data = digits_split(split)
    return Dataset(data.x[:n], data.y[:n], f"digits:{split}[:{n}]", indices=data.indices[:n])


def train(checkpoint_dir: str | None) -> torch.nn.Module:
    torch.set_num_threads(1)
    return adversarial_training(seeded_init(DigitsCNN, 0), small_split("train", 300), method="pgd", eps=0.2,
                                steps=3, epochs=2, batch_size=50, val_data=small_split("test", 90), seed=0,
                                checkpoint_dir=checkpoint_dir)


if __name__ == "__main__":
    out, checkpoints = sys.argv[1], sys.argv[2]
    model = train(checkpoints)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + ".safetensors")
        with open(out + ".json", "w") as handle:
            json.dump(model.defense, handle)
