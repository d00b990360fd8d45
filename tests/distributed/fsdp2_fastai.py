"""fastai training of a `fully_shard`ed (FSDP2) model with `EMACallback`, on 2 gloo processes (CPU), with the integration
proposed for the callback and the checkpoint hooks applied here (see tests/test_distributed.py); per-rank results.

Usage: python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port P fsdp2_fastai.py OUT_DIR
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from common import RANK, ln_model, cpu_state, run_rank
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from fastai.basics import *
from fastxtend_ema import EMACallback
from fastxtend_ema.update import ModelEMA
from fastxtend_ema.distributed import make_model_ema, count_collectives

def propose_integration():
    "The changes proposed for 02_callback (`make_model_ema` in `_setup`) and 05_checkpoint (the EMA state on every rank)"
    import fastxtend_ema.callback as CB, fastxtend_ema.checkpoint as C
    from fastai.torch_core import rank_distrib
    CB.ModelEMA = make_model_ema   # what `_setup` calls
    def save_with_ema(self, file, **kwargs):
        if hasattr(self, 'lr_finder'): return C._fastai_save(self, file, **kwargs)
        swapped = [cb.averager for cb in C._ema_cbs(self) if cb.averager is not None and cb.averager.swapped]
        for a in swapped: a.unswap()
        try:
            path = C._fastai_save(self, file, **kwargs)
            state = C.learner_ema_state(self)   # every rank: a sharded EMA gathers its full state here (a collective)
            if not rank_distrib():
                if state is None: C.ema_file(path).unlink(missing_ok=True)
                else: torch.save(state, C.ema_file(path))
        finally:
            for a in swapped: a.swap()
        return path
    C.save_with_ema = Learner.save = save_with_ema

def main(out, res):
    dist.init_process_group('gloo')
    propose_integration()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 3, generator=g)
    part = lambda r: slice(r*32, r*32+32)   # each rank 24 training rows (3 batches of 8) and 8 validation rows
    ds = list(zip(x[part(RANK)], y[part(RANK)]))
    dls = DataLoaders(DataLoader(ds[:24], bs=8), DataLoader(ds[24:], bs=8), device='cpu')
    model = ln_model(); fully_shard(model[0]); fully_shard(model)
    cb = EMACallback(decay=0.9, validate_ema='both')
    learn = Learner(dls, model, loss_func=MSELossFlat(), opt_func=partial(OptimWrapper, opt=torch.optim.SGD), lr=0.1,
                    cbs=cb, path=out/f'path{RANK}')
    step, res['update_ops'] = cb.after_batch, []
    def after_batch():
        with count_collectives() as ops: step()
        if cb.training: res['update_ops'].append(ops)
    cb.after_batch = after_batch
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    res['averager'] = type(cb.averager).__name__
    res['model_ema_type'] = type(learn.model_ema).__name__
    res['ema'] = cpu_state(learn.model_ema.state_dict())
    res['values'] = [[float(v) for v in vals] for vals in learn.recorder.values]
    learn.save('fsdp')
    dist.barrier()
    res['files'] = sorted(p.name for p in (out/f'path{RANK}'/'models').glob('*'))

    # the reference: one process, a plain model and ModelEMA, over the global batches (both ranks' batch i)
    plain = ln_model(); ema = ModelEMA(plain); ema.reset()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for epoch in range(2):
        for i in range(3):
            rows = torch.cat([torch.arange(r*32+8*i, r*32+8*i+8) for r in range(2)])
            F.mse_loss(plain(x[rows]), y[rows]).backward(); opt.step(); opt.zero_grad()
            ema.update(0.9)
    res['ref'] = cpu_state(ema.module.state_dict())
    valid = torch.cat([torch.arange(r*32+24, r*32+32) for r in range(2)])
    with torch.no_grad(): res['ref_ema_valid_loss'] = F.mse_loss(ema.module(x[valid]), y[valid]).item()

run_rank(main)
