"""From a TrainConfig to batches: which data loader, which collator, and a resumable batch order.

Why the order is a pure function of (seed, epoch): the trainer can then find the micro-batches of any step
without replaying the ones before, so `--resume` continues with exactly the batches an uninterrupted run
would have seen — no data-loader state to save.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

from .data import check_token_ids, epoch_order, load_base_data, pad_collate, pad_id
from .errors import MiniloraError


@dataclass
class Batches:
    """A list of samples cut into batches in a seeded order that is reshuffled every epoch."""

    samples: list  # whatever `collate` takes: dicts with input_ids / labels lists
    batch_size: int
    collate: Callable[[list], dict]  # list of samples -> dict of (B, T) tensors
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True  # training drops a ragged last batch; validation keeps it
    rank: int = 0  # many processes (distributed.py): batch_size is the GLOBAL batch, and this process
    world_size: int = 1  # collates only its own slice (rank) of world_size equal parts of each batch

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.samples), self.batch_size)
        return max(1, full if self.drop_last else full + (rest > 0))

    def order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.samples), self.seed, epoch) if self.shuffle else list(range(len(self.samples)))

    def batch(self, index: int) -> dict:
        """The `index`-th batch counted from the start of training, across epochs."""
        epoch, within = divmod(index, len(self))
        order = self.order(epoch)
        chosen = order[within * self.batch_size:(within + 1) * self.batch_size] or order[: self.batch_size]
        if self.world_size == 1:
            return self.collate([self.samples[i] for i in chosen])
        part = -(-len(chosen) // self.world_size)  # this rank's share: the same global batch as one process
        mine = chosen[self.rank * part:(self.rank + 1) * part]
        if mine:
            return self.collate([self.samples[i] for i in mine])
        # A short last validation batch may leave a rank nothing: it still runs a forward (FSDP's collectives
        # need every rank), on one sample whose labels are all ignored, so it adds no loss and no tokens.
        batch = self.collate([self.samples[chosen[0]]])
        batch["labels"].fill_(-100)
        return batch

    def micro_batches(self, step: int, grad_accum: int) -> list[dict]:
        """The micro-batches of optimiser step `step` (0-based)."""
        return [self.batch(step * grad_accum + k) for k in range(grad_accum)]

    def epoch(self, epoch: int) -> Iterator[dict]:
        for i in range(len(self)):
            yield self.batch(epoch * len(self) + i)


def build_datasets(cfg, tokenizer, model_config, rank: int = 0, world_size: int = 1) -> tuple[Batches, Batches]:
    """Training and validation batches for `cfg.mode`: blocks of raw text (base) or chat samples (sft); with many
    processes, this rank's slices of global batches of world_size × cfg.batch_size samples."""
    if cfg.block_size > model_config.max_position_embeddings:
        raise MiniloraError(f"--block-size {cfg.block_size} is longer than the model's context "
                            f"({model_config.max_position_embeddings} positions, max_position_embeddings in "
                            f"{cfg.model}/config.json); use at most that")
    if cfg.mode == "base":
        train, val = load_base_data(cfg.data, tokenizer, cfg.block_size, cfg.text_field, cfg.val_data,
                                    cfg.val_fraction, cfg.seed)
    else:
        from .sft import load_sft_data

        train, val, stats = load_sft_data(cfg.data, tokenizer, cfg.block_size, cfg.val_data, cfg.val_fraction,
                                          cfg.seed, on_error=cfg.on_error, overlong=cfg.overlong,
                                          train_on_prompt=cfg.train_on_prompt, packing=cfg.packing)
        print(f"sft data: {stats.summary()}")
        for warning in stats.warnings:
            print(f"warning: {warning}")
    check_token_ids(train + val, model_config.vocab_size, f"data file {cfg.data}")
    if not val:
        print("note: no validation data (--val-fraction 0 and no --val-data): validation uses the training set")
        val = train
    collate = partial(pad_collate, pad_id=pad_id(tokenizer))
    ranks = {"rank": rank, "world_size": world_size}
    global_batch = cfg.batch_size * world_size  # --batch-size is per process (distributed.py)
    if world_size > 1 and len(train) < global_batch:
        raise MiniloraError(f"{len(train)} training samples cannot fill one global batch of {global_batch} "
                            f"(--batch-size {cfg.batch_size} × {world_size} processes): use fewer processes or "
                            f"a smaller --batch-size")
    return (Batches(train, min(global_batch, len(train)), collate, seed=cfg.seed, **ranks),
            Batches(val, global_batch, collate, shuffle=False, drop_last=False, **ranks))
