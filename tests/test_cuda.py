"""The EMA on a CUDA GPU: skipped without one (CI has none); `python benchmarks/gpu_check.py` runs them where there is.

* the mixed step (bf16 model, fp32 EMA) is the fp32 `lerp_` of the upcast model and allocates nothing, staged or compiled;
* the callback's per-batch work makes no host-device synchronisation (`torch.cuda.set_sync_debug_mode('error')`
  around the callback's own events, not fastai's);
* fastai `MixedPrecision` in fp16 and bf16: the EMA equals the float64 reference, and with fp16 a GradScaler overflow
  (which fastai turns into `CancelStepException`) skips exactly those steps;
* `ema_device='cpu'` for a CUDA model: correct, from pinned memory with non-blocking copies;
* a `torch.compile`d model, `mode='reduce-overhead'` (CUDA graphs) included, validates on the EMA and trains on.
"""
import functools, warnings
import pytest
import torch
from torch import nn
from fastai.basics import Callback, MSELossFlat
from fastai.callback.core import CancelStepException
from fastai.callback.fp16 import MixedPrecision
from fastxtend_ema import EMACallback
from fastxtend_ema.averager import ModelEMA
from fastxtend_ema.test_utils import (synth_learner, synth_model, fit_quiet, valid_loss, Snapshots, reference_ema,
                                      assert_ema_close, allocated_bytes)

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device'),
              pytest.mark.filterwarnings('ignore::UserWarning')]
DEV = torch.device('cuda')

def cuda_learner(cbs, model=None, **kwargs):
    learn = synth_learner(cbs=cbs, model=(model or synth_model()).to(DEV), **kwargs)
    learn.dls.to(DEV)
    return learn


@pytest.mark.parametrize('compile', [False, True])
def test_mixed_step_is_exact_and_allocates_nothing(compile):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.LayerNorm(1024), nn.Linear(1024, 512)).to(DEV, torch.bfloat16)
    ema = ModelEMA(model, compile=compile)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p))
    ref = {n: t.clone().lerp_(dict(model.named_parameters())[n].float(), 0.3) for n,t in ema.module.named_parameters()}
    ema.update(0.7)
    for n,t in ema.module.named_parameters(): torch.testing.assert_close(t, ref[n], atol=0, rtol=1.3e-7)   # within an ulp
    assert allocated_bytes(lambda: ema.update(0.9)) == 0


def test_callback_events_make_no_host_device_sync():
    "The callback's before_fit builds the EMA (copies are fine there); its per-batch events must not sync"
    cb = EMACallback(decay=0.9)
    for name in ('after_batch', 'after_cancel_step', 'after_cancel_batch', 'before_train'):
        orig = getattr(cb, name)
        @functools.wraps(orig)
        def checked(orig=orig):
            torch.cuda.set_sync_debug_mode('error')
            try: return orig()
            finally: torch.cuda.set_sync_debug_mode('default')
        setattr(cb, name, checked)
    learn = cuda_learner([cb])
    fit_quiet(learn, 2)
    assert cb.updates == 12


class Overflow(Callback):
    "Makes the scaled gradients of chosen optimizer steps infinite, as an fp16 overflow would"
    order = MixedPrecision.order - 1
    def __init__(self, steps): self.steps,self.n = set(steps),0
    def after_backward(self):
        self.n += 1
        if self.n in self.steps: next(self.learn.model.parameters()).grad.fill_(float('inf'))


@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
def test_mixed_precision_matches_float64_reference(dtype):
    snaps = Snapshots()
    cbs = [EMACallback(decay=0.8), snaps] + ([Overflow({3, 4, 9})] if dtype == 'fp16' else [])
    learn = cuda_learner(cbs)
    learn = learn.to_fp16() if dtype == 'fp16' else learn.to_bf16()
    fit_quiet(learn, 2)
    skipped = 3 if dtype == 'fp16' else 0
    assert len(snaps.steps) == 12 - skipped and learn.ema.updates == 12 - skipped
    assert_ema_close(learn.model_ema, reference_ema(snaps.initial, snaps.steps, [0.8]*len(snaps.steps)), eps=1e-5)


def test_ema_in_host_memory_for_a_cuda_model():
    snaps = Snapshots()
    learn = cuda_learner([EMACallback(decay=0.8, ema_device='cpu'), snaps])
    fit_quiet(learn, 2)
    assert learn.model_ema[0].weight.device.type == 'cpu'
    remote = learn.ema.averager.avg.remote
    assert remote is not None and remote.defer and all(s.is_pinned() for s in remote.staging)
    assert_ema_close(learn.model_ema, reference_ema(snaps.initial, snaps.steps, [0.8]*12), eps=1e-6)


@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_compiled_model_validates_on_the_ema(mode):
    learn = cuda_learner([EMACallback(decay=0.8)], model=synth_model(norm=nn.LayerNorm))
    plain = learn.model
    learn.model = torch.compile(plain, mode=mode)
    fit_quiet(learn, 2)
    recorded = learn.recorder.values[-1][1]
    ema_loss, raw_loss = valid_loss(learn.model_ema, learn.dls), valid_loss(plain, learn.dls)
    assert abs(recorded - ema_loss) < 1e-4 and abs(raw_loss - ema_loss) > 1e-3, (recorded, ema_loss, raw_loss)
    x = torch.cat([b[0] for b in learn.dls.valid])
    learn.model.eval()
    with torch.no_grad(): torch.testing.assert_close(learn.model(x), plain(x))
