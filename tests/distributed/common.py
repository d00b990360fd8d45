"Helpers shared by the scripts `tests/test_distributed.py` launches with `torch.distributed.run` (2 gloo processes)."
import os, sys, traceback
from pathlib import Path
import torch
from torch import nn

RANK, WORLD = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))

def xy(n=128, seed=0):
    "Synthetic regression data: 96 training then 32 validation rows"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.], [-2.], [.5], [3.]]) + 0.3*torch.randn(n, 1, generator=g)
    return x, y

def mlp(seed=0):
    "No BatchNorm (a DDP run and a single process agree), a frozen bias (a copied tensor)"
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4,16), nn.ReLU(), nn.Linear(16,1))
    m[2].bias.requires_grad_(False)
    return m

def bn_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4,16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16,1))
    m[3].bias.requires_grad_(False)
    return m

def ln_model(seed=0):
    "For FSDP2: uneven shards (9 and 3 rows over 2 ranks), a LayerNorm, a frozen bias (a copied tensor)"
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5,9), nn.LayerNorm(9), nn.ReLU(), nn.Linear(9,3))
    m[3].bias.requires_grad_(False)
    return m

def cpu_state(sd): return {k:v.detach().clone().cpu() for k,v in sd.items()}

def run_rank(main):
    "Run `main(res)`, save `res` to `<out>/rank<R>.pt` (the first argument), and leave without interpreter teardown"
    out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
    res, rc = {}, 0
    try: main(out, res)
    except BaseException:
        res['error'] = traceback.format_exc(); rc = 1
        sys.stderr.write(res['error'])
    torch.save(res, out/f'rank{RANK}.pt')
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(rc)   # a process that ran DDP Learners can abort in interpreter teardown ("terminate called without an active exception")
