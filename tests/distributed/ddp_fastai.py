"""fastai DDP training with an EMA callback, on 2 gloo processes (CPU); per-rank results for tests/test_distributed.py.

Usage: python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port P ddp_fastai.py OUT_DIR
"""
import sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from common import RANK, xy, mlp, bn_model, cpu_state, run_rank
import torch
from fastai.basics import *
from fastai.distributed import DistributedDL
from fastai.callback.tracker import SaveModelCallback
from fastxtend_ema import EMACallback, PostHocEMA, BEMACallback
from fastxtend_ema.update import unwrap_model
from fastxtend_ema.distributed import broadcast_buffers_
from fastxtend_ema.test_utils import count_collectives

def _broadcast(self, t, rank):
    "fastai 2.8's `DistributedDL._broadcast` without its `.cuda()`: gloo broadcasts CPU tensors"
    t = torch.LongTensor(t); torch.distributed.broadcast(t, rank); return t.tolist()
DistributedDL._broadcast = _broadcast

def dls():
    x, y = xy(); ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds[:96], bs=16, shuffle=False), DataLoader(ds[96:], bs=16), device='cpu')

def learner(model, path, cbs=None):
    return Learner(dls(), model, loss_func=MSELossFlat(), opt_func=SGD, lr=0.05, cbs=cbs, path=path)

def ddp_fit(learn, n, **kwargs):
    with learn.no_bar(), learn.no_logging(), learn.distrib_ctx(cpu=True, sync_bn=False): learn.fit(n, **kwargs)

def watch(learn, cb, rec):
    "Record the model the EMA is built on, and the collectives of each EMA step and of each training batch"
    setup, step, one = cb._setup, cb.after_batch, learn._do_one_batch
    rec['ema_step_ops'], rec['batch_ops'] = [], []
    def _setup():
        rec['built_on'] = type(cb.learn.model).__name__
        setup()
        rec['shadows_inner'] = cb.averager.model is unwrap_model(cb.learn.model)
        rec['broadcast_buffers'] = getattr(cb.learn.model, 'broadcast_buffers', None)
    def after_batch():
        with count_collectives() as ops: step()
        if cb.training: rec['ema_step_ops'].append(ops)
    def _do_one_batch():
        with count_collectives() as ops: one()
        if learn.training: rec['batch_ops'].append(ops)
    cb._setup, cb.after_batch, learn._do_one_batch = _setup, after_batch, _do_one_batch
    return cb

def finish(learn, rec):
    rec['ema'] = cpu_state(learn.model_ema.state_dict())
    rec['model'] = cpu_state(learn.model.state_dict())
    rec['names'] = list(learn.recorder.metric_names)
    rec['values'] = [[float(v) for v in vals] for vals in learn.recorder.values]

class Snapshots(Callback):
    "Float64 copies of the model's state after every optimizer step, and at the start of training"
    order = 100
    def before_train(self):
        if self.epoch == 0: self.initial = self._snap()
    def before_fit(self): self.steps = []
    def _snap(self): return {n:t.detach().double().clone() for n,t in unwrap_model(self.learn.model).state_dict().items()}
    def after_step(self): self.steps.append(self._snap())

class EMATrace(Callback):
    "The EMA's state after every EMA update, and after every epoch (validation included)"
    order = 101
    def before_fit(self): self.steps, self.epochs = [], []
    def _ema(self): return cpu_state(self.learn.ema.averager.module.state_dict())
    def after_batch(self):
        if self.training: self.steps.append(self._ema())
    def after_epoch(self): self.epochs.append(self._ema())

BN_LEARNERS = {}
def bn_scenario(rec, path, validate_ema):
    learn = BN_LEARNERS[path.name[:-1]] = learner(bn_model(seed=RANK), path)
    cb, snaps, trace, pre = watch(learn, EMACallback(decay=0.9, validate_ema=validate_ema), rec), Snapshots(), EMATrace(), []
    hook = learn.model[1].register_forward_pre_hook(lambda m, i: pre.append(m.running_mean.clone()) if m.training else None)
    ddp_fit(learn, 2, cbs=[cb, snaps, trace])
    hook.remove()
    finish(learn, rec)
    rec.update(pre_forward_running_mean=pre, initial=snaps.initial, steps=snaps.steps, ema_steps=trace.steps, ema_epochs=trace.epochs)

def main(out, res):
    path = out/f'path{RANK}'      # each rank its own folder: only rank 0 may write files

    # EMA callback given to fit(): built after the DDP wrap; validated raw and EMA; a checkpoint every epoch
    rec = res['fit_cbs'] = {}
    learn = learner(mlp(seed=RANK), path)   # different initial weights per rank: DDP gives every rank rank 0's
    cb = watch(learn, EMACallback(decay=0.9, validate_ema='both'), rec)
    ddp_fit(learn, 2, cbs=[cb, SaveModelCallback(every_epoch=True)])
    finish(learn, rec)
    rec['files'] = sorted(p.name for p in (path/'models').glob('*'))

    # EMA callback given to the Learner: built before the DDP wrap (same order, 11; fastai's sort is stable)
    rec = res['learner_cbs'] = {}
    learn = learner(mlp(seed=RANK), path)
    cb = watch(learn, EMACallback(decay=0.9, validate_ema='both'), rec)
    learn.add_cb(cb)
    ddp_fit(learn, 2)
    finish(learn, rec)

    # the same again: this scenario once ran a patched EMAPairs; the fix is in the library now, so it runs the
    # library's own code like every scenario after it
    rec = res['learner_cbs_fixed'] = {}
    learn = learner(mlp(seed=RANK), path)
    cb = watch(learn, EMACallback(decay=0.9, validate_ema='both'), rec)
    learn.add_cb(cb)
    ddp_fit(learn, 2)
    finish(learn, rec)

    # resume from rank 0's epoch-0 checkpoint, loaded on every rank, with the callback on the Learner
    rec = res['resume'] = {}
    learn = learner(mlp(seed=100+RANK), out/'path0', cbs=EMACallback(decay=0.9, validate_ema='both'))
    learn.load('model_0')
    rec['loaded_ema'] = cpu_state(learn.model_ema.state_dict())
    ddp_fit(learn, 2, start_epoch=1)
    finish(learn, rec)

    # BatchNorm: each rank its own batches, DDP's buffer broadcast; validated on the EMA weights, or not at all
    for key,validate_ema in (('bn', True), ('bn_novalid', False)):
        bn_scenario(res.setdefault(key, {}), out/f'{key}{RANK}', validate_ema)
    # save (rank 0) and load (every rank) of the BatchNorm EMA; then every rank gets rank 0's buffers in memory
    learn = BN_LEARNERS['bn_novalid']
    rec = res['bn_novalid']
    learn.add_cb(EMACallback())   # checkpoints carry the EMA on a Learner with an EMA callback: learn.model_ema here
    learn.save('bn')   # by rank 0 only
    rec['files'] = sorted(p.name for p in (out/f'bn_novalid{RANK}'/'models').glob('*'))
    fresh = learner(bn_model(seed=50+RANK), out/'bn_novalid0', cbs=EMACallback())
    torch.distributed.barrier()   # rank 0 has written bn.ema.pth (learn.load reads it before its own barrier: see 'race')
    fresh.load('bn')
    rec['loaded_ema'] = cpu_state(fresh.model_ema.state_dict())
    broadcast_buffers_(learn.model_ema)
    rec['ema_broadcast'] = cpu_state(learn.model_ema.state_dict())

    # BEMA: the callback on the Learner (theta_0 taken at the start, after the wrap), validated raw and BEMA; saved by
    # rank 0, loaded on every rank
    rec = res['bema'] = {}
    learn = learner(mlp(seed=RANK), out/'bema0', cbs=BEMACallback(validate_ema='both'))
    ddp_fit(learn, 2)
    finish(learn, rec)
    rec['plain'] = cpu_state(learn.bema.ema_module.state_dict())
    learn.save('bema')   # by rank 0 only
    torch.distributed.barrier()
    rec['files'] = sorted(p.name for p in (out/'bema0'/'models').glob('*'))
    fresh = learner(mlp(seed=60+RANK), out/'bema0', cbs=BEMACallback())
    fresh.load('bema')
    rec['loaded'] = cpu_state(fresh.model_ema.state_dict())

    # PostHocEMA: every rank tracks the same EMAs; rank 0 alone writes the snapshots
    rec = res['posthoc'] = {}
    learn = learner(mlp(seed=0), out/f'posthoc{RANK}', cbs=PostHocEMA(snapshot_every=2))
    ddp_fit(learn, 2)
    cb = learn.post_hoc_ema
    rec['snapshots'] = list(cb.snapshots)
    rec['files'] = sorted(p.name for p in cb.path.glob('snapshot-*.pt')) if cb.path.exists() else []
    rec['theta_0'] = (cb.path/'theta_0.pt').exists()   # the weights the tracking began with: rank 0 writes them too
    rec['emas'] = [cpu_state(a.module.state_dict()) for a in cb.emas]

    # load right after save, on every rank, while rank 0 is slow to write the EMA file (SaveModelCallback's
    # reload of the best model at the end of fit does this). Once found without a barrier in `load`, which the library
    # has now: both rounds run the library's own code
    for fixed in (False, True):
        rec = res['race_fixed' if fixed else 'race'] = {}
        writer = learner(mlp(seed=0), out/'path0', cbs=EMACallback())
        writer.model_ema = mlp(seed=7 + fixed)
        rec['written'] = cpu_state(writer.model_ema.state_dict())
        save = torch.save
        def slow_save(obj, f, *args, **kwargs):
            if '.ema.pth' in str(getattr(f, 'name', f)):   # the EMA file (a save writes a temporary file, open)
                torch.distributed.barrier()   # tells rank 1 to go on and load, then takes its time
                time.sleep(3)
            return save(obj, f, *args, **kwargs)
        if RANK == 0:
            torch.save = slow_save
            try: writer.save('race')
            finally: torch.save = save
        else:
            writer.save('race')              # writes nothing on rank 1
            torch.distributed.barrier()      # rank 0 is writing the checkpoint, and has not finished
        reader = learner(mlp(seed=1), out/'path0', cbs=EMACallback())
        with warnings.catch_warnings(): warnings.simplefilter('ignore'); reader.load('race')
        m = getattr(reader, 'model_ema', None)
        rec['loaded'] = None if m is None else cpu_state(m.state_dict())

run_rank(main)
