"""
Data parallel training without DistributedDataParallel, written out: under torchrun every process
runs the whole training script on its share of each global batch, the gradients are summed across
processes after each backward pass, and whatever must agree (a stop, a written file, the weights)
is checked across them. With one process every function here does nothing, or the obvious.
"""
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
MASTER = RANK == 0  # only this process writes checkpoints and reports, and prints


LOG = {"path": None}  # the run's log file, out_dir/train.log, once log_to() names it


def log_to(path, fresh=True):
    """Write every log() line to path too, the run's full record; fresh: start the file anew."""
    LOG["path"] = os.path.abspath(path)
    if MASTER and fresh:
        os.makedirs(os.path.dirname(LOG["path"]), exist_ok=True)
        open(LOG["path"], "w").close()


def log(*args, console=True):
    """A line of the run (rank 0 only): to the log file, and to the console unless console=False
    (the step lines of long stages, which would bury what a reader came for)."""
    if not MASTER:
        return
    line = " ".join(str(a) for a in args)
    if LOG["path"]:
        os.makedirs(os.path.dirname(LOG["path"]), exist_ok=True)  # a run may remove its out_dir
        with open(LOG["path"], "a") as f:
            print(line, file=f)
    if console:
        tqdm.write(line)


def start_processes(cfg, prog="train.py"):
    """Under torchrun: join the other processes, each on its own GPU when there are GPUs."""
    if WORLD == 1:
        return
    if cfg.batch_size % WORLD:
        raise SystemExit(f"{prog}: --batch_size={cfg.batch_size} must be a multiple of the "
                         f"{WORLD} processes")
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)


def gathered(compute, split, device):
    """compute(split) -> a list of tensors, for a whole split: each process computes a contiguous
    shard, and every process gets all of it, on device."""
    if WORLD == 1:
        return compute(split)
    parts = [None] * WORLD
    mine = (split.tensor_split(WORLD)[RANK] if isinstance(split, torch.Tensor)
            else split.shard(WORLD, RANK, contiguous=True))
    dist.all_gather_object(parts, [t.cpu() for t in compute(mine)])
    return [torch.cat(shards).to(device) for shards in zip(*parts)]


def all_ok(ok):
    """True only if ok is True in every process: they must stop together, or the others wait
    forever."""
    if WORLD == 1:
        return ok
    flag = torch.tensor([float(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def rng_states(cfg):
    """Every process's random streams (CPU, and CUDA when used), so that each resumes its own."""
    mine = [torch.get_rng_state(),
            torch.cuda.get_rng_state() if cfg.device.startswith("cuda") else None]
    if WORLD == 1:
        return [mine]
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, mine)
    return everyone


def my_share(batch):
    """This process's rows of a global batch (every process sees the same batches, each takes a
    slice), and their fraction of the batch; None when the batch is too small to give every process
    a row (all skip it alike)."""
    n = len(batch["index"])
    if WORLD == 1:
        return batch, 1.0
    if n < WORLD:
        return None, 0.0
    lo, hi = RANK * n // WORLD, (RANK + 1) * n // WORLD
    return {k: v[lo:hi] for k, v in batch.items()}, (hi - lo) / n


def sum_gradients(params):
    """What DistributedDataParallel does: each process's loss is weighted by its fraction of the
    batch, so the sum of their gradients is the gradient of the batch mean."""
    if WORLD > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)


def check_replicas(model, stage, prog="train.py"):
    """Every process must hold the same weights: compare each tensor's sum and sum of squares."""
    if WORLD == 1:
        return
    mine = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                        for p in model.state_dict().values()])
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, mine.cpu())
    if not all(torch.equal(everyone[0], other) for other in everyone):
        raise SystemExit(f"{prog}: the {WORLD} processes hold different weights after stage "
                         f"{stage}")
    log(f"replicas identical after stage {stage} ({WORLD} processes)")
