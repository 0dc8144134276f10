"""Calibration and QAT under torch.distributed (2 processes, gloo on the CPU): observers combine their statistics
across ranks, so every rank ends with bit-identical scales, equal to one process calibrating on all the data;
QAT with DistributedDataParallel keeps weights, learned scales and running activation statistics identical."""
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
