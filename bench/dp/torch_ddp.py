#!/usr/bin/python3
"""PyTorch peer of bench/dp/dp_bench.cpp: the same MLP (4 x Linear(1024, 1024) + ReLU), batch
64 per rank, SGD, 1 thread per process.

  --mode single   the bare model in this process
  --mode ddp      DistributedDataParallel (default buckets, 25 MiB) with gloo on 2 processes
                  on 127.0.0.1 (env://)

Prints "torch <single|ddp2> <round> <ms per step>" (the slowest rank's, for ddp). Run with
Debian's /usr/bin/python3 (python3-torch); bench/dp/run_dp_bench.sh calls it.
"""
import argparse
import os
import socket
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


def run_steps(model, steps, warmup, barrier=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, WIDTH)
    t = torch.randn(BATCH, WIDTH)
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
    sec = run_steps(model, steps, warmup, barrier=dist.barrier)
    queue.put(sec)
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
    sec = max(queue.get() for _ in range(2))
    print(f"torch ddp2 {a.round} {sec * 1e3:.4f}", flush=True)


if __name__ == "__main__":
    main()
