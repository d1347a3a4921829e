#!/usr/bin/python3
"""PyTorch peer of bench/dp/dp_bench.cpp: the same MLP (4 x Linear(1024, 1024) + ReLU), batch
64 per rank, SGD, 1 thread per process.

  --mode single   the bare model in this process
  --mode ddp      DistributedDataParallel (default buckets, 25 MiB) with gloo on 2 processes
                  on 127.0.0.1 (env://)

Each rank draws its own input (seeded by its rank) and the same target, as in dp_bench.

Prints "torch <single|ddp2> <round> <ms per step>" (the slowest rank's, for ddp). For ddp it also
checks that DDP really reduced the gradients: every rank's parameters after the run must hold the
same bits (with different inputs per rank, replicas that skipped the all-reduce drift apart) and
be finite; it prints "check torch ddp2 <round> <max |difference| between ranks> <equal: 1|0>
<ok|FAILED>" and exits 2 when the check failed. Run with Debian's /usr/bin/python3
(python3-torch); bench/dp/run_dp_bench.sh calls it.
"""
import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WIDTH, BATCH, DEPTH = 1024, 64, 4


def make_model():
    torch.manual_seed(1)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def run_steps(model, steps, warmup, rank=0, barrier=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(2 + rank))
    t = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(3))
    for s in range(warmup + steps):
        if s == warmup:
            if barrier:
                barrier()
            t0 = time.perf_counter()
        opt.zero_grad()
        loss = 0.5 * ((model(x) - t) ** 2).sum() / BATCH
        loss.backward()
        opt.step()
    if barrier:
        barrier()
    return (time.perf_counter() - t0) / steps


def ddp_worker(rank, world, port, steps, warmup, queue):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    sec = run_steps(model, steps, warmup, rank=rank, barrier=dist.barrier)
    # The check: the replicas' parameters, elementwise max - min over the ranks.
    with torch.no_grad():
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        finite = torch.isfinite(flat).all().to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        diff = (hi - lo).abs().max().item() if finite.item() == 1 else float("inf")
    queue.put((sec, diff))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single", "ddp"], required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--round", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.mode == "single":
        sec = run_steps(make_model(), a.steps, a.warmup)
        print(f"torch single {a.round} {sec * 1e3:.4f}", flush=True)
        return
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(ddp_worker, args=(2, free_port(), a.steps, a.warmup, queue), nprocs=2, join=True)
    results = [queue.get() for _ in range(2)]
    sec = max(r[0] for r in results)
    diff = max(r[1] for r in results)
    ok = diff == 0.0
    print(f"torch ddp2 {a.round} {sec * 1e3:.4f}", flush=True)
    print(f"check torch ddp2 {a.round} {diff:.3e} {1 if ok else 0} {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        sys.exit(2)


if __name__ == "__main__":
    main()
