"""Run by tests/distributed/test_parallel.py as each rank of a group: the kernels' all-reduce (parallel.reducer).

    python tests/distributed/reducer_worker.py sum OUT        every rank sums a small and a large (chunked) tensor
    python tests/distributed/reducer_worker.py exit|stall T   rank 1 exits, or never arrives; rank 0 (timeout T s)
                                                  prints how long it waited and the error it got
"""

import os
import sys
import time

import torch


def main() -> None:
    from llamalite.distributed.group import from_env
    from llamalite.distributed.tensor_parallel import reducer, transport

    mode, arg = sys.argv[1], sys.argv[2]
    shard = from_env()
    summer = reducer(8, timeout_s=float(arg) if mode != "sum" else 60.0)
    if mode == "sum":
        parts = [torch.randn(600_000, generator=torch.Generator().manual_seed(r)) for r in range(shard.world)]
        small, large = parts[shard.rank][:5].clone(), parts[shard.rank].clone()
        summer.all_reduce_(small)
        summer.all_reduce_(large)  # more than a slot holds (262,144 floats): summed in pieces
        torch.save({"small": small, "large": large, "parts": parts, "transport": transport()},
                   os.path.join(arg, f"{shard.rank}.pt"))
        return
    if shard.rank == 1:
        if mode == "exit":
            os._exit(3)
        time.sleep(60)
        return
    start = time.perf_counter()
    try:
        summer.all_reduce_(torch.ones(8))
        print("summed")
    except RuntimeError as e:
        print(f"{time.perf_counter() - start:.2f} {e}".splitlines()[0])


if __name__ == "__main__":
    main()
