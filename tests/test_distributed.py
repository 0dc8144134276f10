"""Calibration and QAT under torch.distributed (2 processes, gloo on the CPU): observers combine their statistics
across ranks, so every rank ends with bit-identical scales, equal to one process calibrating on all the data;
QAT with DistributedDataParallel keeps weights, learned scales and running activation statistics identical.
At 4 bits (MSE activation statistics, averaged over batches; learned weight rounding) every quantizer parameter
and every rounded weight is the same on both ranks and the same as one process's, bit for bit."""
import torch
import torch.multiprocessing as mp
from torch import nn

import quantfx

WORLD = 2
LEARNED = {nn.ReLU: dict(act_learned_scale=True)}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) * (1 + i) for i in range(n)]  # ranges differ batch to batch


CALIB = batches(6, 1)


def state(q) -> dict:
    return {k: v.detach().clone() for k, v in q.state_dict().items() if torch.is_tensor(v)}


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        mine = CALIB[rank::WORLD]  # each rank calibrates on its share
        q = quantfx.quantize(model(), "finn", calibration_data=mine, overrides=LEARNED, progress=False)
        calibrated = state(q)
        q.train()
        ddp = DistributedDataParallel(q, broadcast_buffers=False)  # running statistics synced by quantfx itself
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        for x in batches(3, 100 + rank):  # a different batch on every rank
            loss = ddp(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"calibrated": calibrated, "trained": state(q)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_calibration_and_qat_agree_across_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = state(quantfx.quantize(model(), "finn", calibration_data=CALIB, overrides=LEARNED, progress=False))
    stats = [k for k in single if k.endswith(".stat") or k.endswith("scale_param")]
    assert len(stats) >= 4, stats
    for key, value in single.items():
        for r in ranks:
            assert torch.equal(r["calibrated"][key], value), key  # = one process on all the data, bit for bit
    trained = ranks[0]["trained"]
    changed = [k for k in stats if not torch.equal(trained[k], single[k])]
    assert changed, "QAT moved no scale or statistic"  # the check below compares something that trained
    for key, value in trained.items():
        assert torch.equal(ranks[1]["trained"][key], value), key


LOW_BIT = dict(weight_bit_width=4, act_bit_width=4, weight_rounding="learned", progress=False)


def low_bit_state(q) -> dict:
    """Every tensor of the compiled model's state: quantizer statistics and scales, weights (learned rounding
    writes its integers into them), biases."""
    return {k: v.detach().clone() for k, v in q.state_dict().items() if torch.is_tensor(v)}


def _low_bit_worker(rank, init_file, out_dir, iterations):
    import torch.distributed as dist
    from quantfx import weight_rounding
    weight_rounding.DEFAULT_ITERATIONS = iterations  # the parent's (tests/conftest.py shortens it)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        q = quantfx.quantize(model(), "finn", calibration_data=CALIB[rank::WORLD], **LOW_BIT)
        torch.save(low_bit_state(q), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_low_bit_statistics_and_learned_rounding_agree_with_one_process(tmp_path):
    from quantfx import weight_rounding
    mp.spawn(_low_bit_worker, args=(str(tmp_path / "init"), str(tmp_path), weight_rounding.DEFAULT_ITERATIONS),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same float kernels
    try:
        q = quantfx.quantize(model(), "finn", calibration_data=CALIB, **LOW_BIT)
    finally:
        torch.set_num_threads(threads)
    single = low_bit_state(q)
    rounded = [r for r in q.notes["weight_rounding"] if " 0/" not in r]
    assert len(rounded) >= 2, q.notes["weight_rounding"]  # layers learned integers other than nearest's
    mse = [m for m in quantfx.calibration.quantizers(q, "act") if m.calibrated_by == "mse"]
    assert len(mse) >= 3, [m.calibrated_by for m in quantfx.calibration.quantizers(q, "act")]
    weights = [k for k in single if k.endswith(".weight")]
    assert len(weights) == 3, weights
    for r in ranks:
        differ = [k for k, value in single.items() if r[k].shape != value.shape or not torch.equal(r[k], value)]
        assert not differ, differ
    # the check compares something: one rank alone (half the data) learns other statistics
    half = low_bit_state(quantfx.quantize(model(), "finn", calibration_data=CALIB[0::WORLD], **LOW_BIT))
    assert any(not torch.equal(half[k], single[k]) for k in single if k.endswith(".stat"))
