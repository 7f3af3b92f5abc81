"""The shared tuning loop: which windows each pass visits, and the schedule's length."""
import torch

from converter.optim import adam_cosine, cosine_lr


def _run(n: int, batch: int, epochs: float) -> tuple[list[list[int]], list[tuple[int, int]], torch.Tensor]:
    """Fit w to the mean of 1..n with the loop; returns the batches seen, (step, steps) reports and w."""
    w = torch.nn.Parameter(torch.zeros(()))
    data = torch.arange(1, n + 1, dtype=torch.float32)
    seen, reports = [], []

    def loss(idx):
        seen.append(idx.tolist())
        return ((w - data[idx]) ** 2).mean()

    adam_cosine([{"params": [w], "lr": 0.5}], n, batch, epochs, 7, loss, lambda s, t, v: reports.append((s, t)))
    return seen, reports, w.detach()


def test_whole_passes_visit_every_window_once_each():
    seen, reports, _ = _run(7, 2, 2)
    flat = [i for b in seen for i in b]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:]) == list(range(7))
    assert [t for _, t in reports] == [8] * 8 and reports[-1][0] == 8


def test_a_fractional_pass_visits_that_share_of_distinct_windows():
    seen, reports, _ = _run(7, 2, 1.75)
    flat = [i for b in seen for i in b]
    assert sorted(flat[:7]) == list(range(7))
    tail = flat[7:]
    assert len(tail) == 5 and len(set(tail)) == 5  # round(0.75 × 7) windows, none twice
    assert len(reports) == 4 + 3 and all(t == 7 for _, t in reports)


def test_whole_epochs_keep_the_earlier_order():
    """Lengthening by a fraction must not change what whole-epoch runs (refinement, resumed runs) see."""
    seen, _, _ = _run(5, 1, 2)
    gen = torch.Generator().manual_seed(7)
    expected = torch.randperm(5, generator=gen).tolist() + torch.randperm(5, generator=gen).tolist()
    assert [b[0] for b in seen] == expected


def test_the_loop_minimises_the_loss():
    _, _, w = _run(9, 3, 30)
    assert abs(float(w) - 5.0) < 0.2


def test_cosine_lr_ends_at_the_floor():
    assert cosine_lr(2.0, 0, 10) == 2.0
    assert abs(cosine_lr(2.0, 10, 10) - 0.02) < 1e-12
