"""FSDP2 (`fully_shard`) training in a plain torch loop with `ShardedModelEMA`, on 2 gloo processes (CPU), beside a
single-process model and `ModelEMA` trained on the same global batches; per-rank results for tests/test_distributed.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port P fsdp2.py OUT_DIR
"""
import sys, copy
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from common import RANK, ln_model as model, cpu_state, run_rank
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from fastxtend_ema.update import named_tensors
from fastxtend_ema.averager import ModelEMA, ShardedModelEMA, make_averager, local_tensor, is_sharded, ema_state
from fastxtend_ema.test_utils import count_collectives

def shard(m):
    fully_shard(m[0]); fully_shard(m)
    return m

class Stash:
    "Stores the last output of `m`, as fastai's `Hook` does"
    def __init__(self, m): self.stored,self.handle = None,m.register_forward_hook(self.hook_fn)
    def hook_fn(self, m, i, o): self.stored = o

class Skip(nn.Module):
    "A U-Net's skip connection in miniature: the head adds what a hook the model owns stored during the body's forward"
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body,self.head = nn.Linear(5, 5),nn.Linear(5, 5)
        self.stash = Stash(self.body)
    def forward(self, x): return self.head(self.body(x)) + self.stash.stored

def local_state(ema:ShardedModelEMA): return {n:t.detach().clone() for n,t in ema.ema.items()}

def main(out, res):
    dist.init_process_group('gloo')
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(8, 16, 5, generator=g), torch.randn(8, 16, 3, generator=g)   # 8 global batches of 16 rows
    mine = slice(RANK*8, (RANK+1)*8)                                                   # this rank's 8 rows of each
    plain, sharded = model(), shard(model())
    ema_p, ema_s = ModelEMA(plain), make_averager(sharded)
    res['types'] = type(ema_p).__name__, type(ema_s).__name__
    opt_p, opt_s = torch.optim.SGD(plain.parameters(), lr=0.1), torch.optim.SGD(sharded.parameters(), lr=0.1)
    res['update_ops'], res['step_ops'] = [], []
    for i in range(8):
        with count_collectives() as ops:
            F.mse_loss(sharded(xs[i][mine]), ys[i][mine]).backward(); opt_s.step(); opt_s.zero_grad()
        res['step_ops'].append(ops)
        with count_collectives() as ops: ema_s.update(0.8)
        res['update_ops'].append(ops)
        F.mse_loss(plain(xs[i]), ys[i]).backward(); opt_p.step(); opt_p.zero_grad()
        ema_p.update(0.8)
        if i == 3:   # validation on the EMA weights halfway; training then goes on from the training weights
            x = torch.randn(6, 5, generator=g)
            before = {n:local_tensor(t).clone() for n,t in named_tensors(sharded).items()}
            sharded.eval(); ema_s.swap()
            with torch.no_grad(): res['valid_out'] = sharded(x)
            ema_s.unswap(); sharded.train()
            res['restored'] = all(torch.equal(local_tensor(t), before[n]) for n,t in named_tensors(sharded).items())
            with torch.no_grad(): res['valid_ref'] = ema_p.module(x)
    res['ema_local'] = local_state(ema_s)
    res['ema_ref'] = cpu_state(ema_p.module.state_dict())
    res['model_local'] = {n:local_tensor(t).detach().clone() for n,t in named_tensors(sharded).items()}
    res['model_ref'] = cpu_state(plain.state_dict())
    res['ema_nbytes'] = ema_s.nbytes()
    res['ema_storage_nbytes'] = sum(t.untyped_storage().nbytes() for t in ema_s.ema.values())
    res['full_nbytes'] = sum(t.numel()*t.element_size() for t in ema_p.module.state_dict().values())
    big = shard(nn.Sequential(nn.Linear(64,256), nn.ReLU(), nn.Linear(256,64)))   # even shards: exactly half per rank
    res['big_nbytes'] = ShardedModelEMA(big).nbytes()

    # the full state: gathered (a collective), plain names, loads into a plain model; `module` is a plain module
    with count_collectives() as ops: sd = ema_s.tensors()
    res['state_dict_ops'], res['state_dict'] = ops, cpu_state(sd)
    fresh = model(seed=1); fresh.load_state_dict(sd)
    m = ema_s.module
    res['module_type'] = type(m).__name__, any(isinstance(p, DTensor) for p in m.parameters()), is_sharded(m), m.training
    x = torch.randn(4, 5, generator=g)
    with torch.no_grad(): res['module_out'], res['module_ref'], res['fresh_out'] = m(x), ema_p.module(x), fresh(x)
    res['module_again'] = ema_s.module is m

    # loading a full state: every rank keeps its slice, with no communication; then the EMA written into the model
    with count_collectives() as ops: ema_s.load_state(ema_state(True, 0, 0, ema_p.module.state_dict()))
    res['load_ops'], res['loaded_local'] = ops, local_state(ema_s)
    ema_s.copy_to_model()
    with torch.no_grad(): res['copied_out'] = sharded(x)   # all-gathers the EMA weights the model now holds

    # bf16 shards: fp32 EMA shards with ModelEMA's values (no training: the same weights set on both sides)
    b_p, b_s = model().bfloat16(), shard(model().bfloat16())
    e_p, e_s = ModelEMA(b_p), ShardedModelEMA(b_s)
    with torch.no_grad():
        for step in range(3):
            for n,t in named_tensors(b_p).items():
                if t.is_floating_point(): t.add_(0.25*(step+1))
            for n,t in named_tensors(b_s).items():
                if t.is_floating_point(): local_tensor(t).add_(0.25*(step+1))
            e_p.update(0.7); e_s.update(0.7)
    res['bf16_local'], res['bf16_ref'] = local_state(e_s), cpu_state(e_p.module.state_dict())

    # a model that owns a hook: the plain module runs its own copy of it (on another batch size than the training one,
    # after a forward with gradients left a non-leaf tensor in it); FSDP's hooks stay behind
    sk = Skip(); fully_shard(sk.body); fully_shard(sk)
    sk(xs[0][mine]).sum().backward()
    m = ShardedModelEMA(sk).module
    res['skip_hooks'] = [(n, len(c._forward_pre_hooks), len(c._forward_hooks)) for n,c in m.named_modules()]
    ref = Skip(seed=1); ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 5, generator=g)
    with torch.no_grad():
        try: res['skip_out'] = m(x)
        except RuntimeError as e: res['skip_out'] = repr(e)
        res['skip_ref'] = ref(x)
    dist.destroy_process_group()

run_rank(main)
