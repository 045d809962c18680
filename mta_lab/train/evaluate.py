"""Evaluation of a model on a run's data: validation loss, perplexity and bits per byte per corpus
(and their averages, like the paper's per-subset table), and each task's held-out set.

Pure torch: the Lightning module calls it, and so can a notebook.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from mta_lab.assembly.run_data import RunData
from mta_lab.tasks import Cell, Example, Tally

ROW_TOKEN_BUDGET = 1 << 16
"""Tokens per task evaluation batch: long examples go a few at a time."""


def token_nll(logits_btv: torch.Tensor, targets_bt: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in fp32, (b, t)."""
    return F.cross_entropy(logits_btv.flatten(0, 1).float(), targets_bt.flatten(), reduction="none").view_as(
        targets_bt
    )


def masked_mean_nll(
    logits_btv: torch.Tensor, targets_bt: torch.Tensor, mask_bt: torch.Tensor
) -> torch.Tensor:
    """The training loss: mean NLL over the target positions."""
    return (token_nll(logits_btv, targets_bt) * mask_bt).sum() / mask_bt.sum().clamp(min=1)


class Evaluator:
    def __init__(self, run_data: RunData, batches: int, batch_size: int):
        self.run_data = run_data
        self.batch_size = batch_size
        self.val_rows = {name: run_data.val_rows(name, batches * batch_size) for name in run_data.corpora}
        self.token_bytes = torch.from_numpy(run_data.tokenizer.token_bytes)

    @torch.no_grad()
    def __call__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            metrics = self._corpora(model, device, autocast)
            for name, task in self.run_data.tasks.items():
                tallies = self._score(model, device, autocast, self.run_data.eval_examples[name])
                metrics.update(task.metrics(tallies))
        finally:
            model.train(was_training)
        return metrics

    def _corpora(self, model, device, autocast) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, rows in self.val_rows.items():
            nll_sum, n_tokens, n_bytes = 0.0, 0, 0
            for first in range(0, len(rows), self.batch_size):
                batch = torch.from_numpy(rows[first : first + self.batch_size]).to(device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                with autocast():
                    logits = model(inputs)
                nll = token_nll(logits, targets)
                nll_sum += nll.sum().item()
                n_tokens += targets.numel()
                # Bits per byte count the text's bytes; BOS/EOS targets stand for none (spec 4.1 packs
                # documents as BOS + text + EOS), so their loss is charged to the bytes around them.
                n_bytes += int(self.token_bytes[targets.cpu()].sum())
            loss = nll_sum / n_tokens
            metrics[f"val/{name}/loss"] = loss
            metrics[f"val/{name}/ppl"] = math.exp(loss)
            metrics[f"val/{name}/bpb"] = nll_sum / (math.log(2) * n_bytes) if n_bytes else float("nan")
        if self.val_rows:
            names = list(self.val_rows)
            metrics["val/loss"] = float(np.mean([metrics[f"val/{n}/loss"] for n in names]))
            metrics["val/ppl"] = float(np.mean([metrics[f"val/{n}/ppl"] for n in names]))
            metrics["val/bpb"] = float(np.mean([metrics[f"val/{n}/bpb"] for n in names]))
        return metrics

    def _score(self, model, device, autocast, examples: list[Example]) -> dict[Cell, Tally]:
        """Teacher-forced: a scored token is right when the argmax before it is that token."""
        tallies: dict[Cell, Tally] = defaultdict(Tally)
        by_length: dict[int, list[Example]] = defaultdict(list)
        for example in examples:
            by_length[len(example.tokens)].append(example)
        pad = self.run_data.tokenizer.pad
        for length, group in sorted(by_length.items()):
            per_batch = max(1, min(self.batch_size, ROW_TOKEN_BUDGET // length))
            for first in range(0, len(group), per_batch):
                chunk = group[first : first + per_batch]
                rows = [example.row(length, pad) for example in chunk]
                tokens = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)
                scored = torch.from_numpy(np.stack([r[1] for r in rows])).to(device)
                with autocast():
                    logits = model(tokens[:, :-1])
                correct = (logits.argmax(-1) == tokens[:, 1:]) | ~scored[:, 1:]
                n_scored = scored[:, 1:].sum(-1)
                n_wrong = (~correct).sum(-1)
                for example, wrong, total in zip(chunk, n_wrong.tolist(), n_scored.tolist(), strict=True):
                    tally = tallies[example.cell]
                    tally.examples += 1
                    tally.examples_correct += wrong == 0
                    tally.tokens += total
                    tally.tokens_correct += total - wrong
        return dict(tallies)
