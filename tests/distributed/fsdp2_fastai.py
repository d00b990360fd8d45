"""fastai training of a `fully_shard`ed (FSDP2) model with `EMACallback`, on 2 gloo processes (CPU): the library's own
callback and checkpoint code (`learn.save` gathers the sharded EMA on every rank, rank 0 writes it); per-rank results.

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
from fastxtend_ema import EMACallback, PostHocEMA
from fastxtend_ema.averager import ModelEMA
from fastxtend_ema.test_utils import count_collectives

def main(out, res):
    dist.init_process_group('gloo')
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

    # PostHocEMA refuses a fully_shard'ed model at the start of fit, before anything is built
    sharded = ln_model(); fully_shard(sharded)
    refused = Learner(dls, sharded, loss_func=MSELossFlat(), cbs=PostHocEMA(), path=out/f'ph{RANK}')
    try:
        with refused.no_bar(), refused.no_logging(): refused.fit(1)
        res['posthoc_refused'] = None
    except ValueError as e: res['posthoc_refused'] = str(e)

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
