"""Switch EMA (Li et al. 2024, arXiv 2402.09240): `switch=True` writes the EMA into the training weights at every epoch's end."""
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastcore.test import test_eq as _eq, test_close as _close
from fastxtend_ema.callback import EMACallback, EMASchedule, ema_holders
from fastxtend_ema.test_utils import synth_learner, fit_quiet, Snapshots, reference_ema, assert_ema_close, assert_same_state

pytestmark = pytest.mark.filterwarnings('ignore::fastxtend_ema.callback.EMAHorizonWarning')

class EpochEnds(Callback):
    "The model's weights and the EMA's at the end of every epoch, after every other callback"
    order = 200
    def before_fit(self): self.models,self.emas = [],[]
    def after_epoch(self):
        self.models.append({k:v.detach().clone() for k,v in self.learn.model.state_dict().items()})
        self.emas.append({k:v.detach().clone() for k,v in ema_holders(self.learn)[0].averager.module.state_dict().items()})

@pytest.mark.parametrize('cb', [lambda: EMACallback(decay=0.8, switch=True),
                                lambda: EMASchedule(0.5, 0.9, finish=0.5, switch=True, update_every=2)], ids=['ema', 'schedule'])
def test_switch_writes_the_ema_into_the_training_weights(cb):
    "After each epoch the training weights equal the EMA; both follow the float64 EMA of the steps that happened"
    snaps,ends = Snapshots(),EpochEnds()
    learn = fit_quiet(synth_learner(cbs=[cb(), snaps, ends]), 3)
    for m,e in zip(ends.models, ends.emas):
        for k in e: _eq(m[k], e[k])   # bit for bit, the integer buffers included
    log = ema_holders(learn)[0]
    decays = ([0.8]*18 if isinstance(log, EMACallback) and not isinstance(log, EMASchedule) else
              [log.update_decay(s+1, s/18) if (s+1) % 2 == 0 else None for s in range(18)])
    for e in range(3):   # the EMA after epoch e is the float64 EMA of the first 6(e+1) steps, and so is the model
        ref = reference_ema(snaps.initial, snaps.steps[:6*(e+1)], decays[:6*(e+1)])
        for k in ref: _close(ends.models[e][k].double(), ref[k], eps=1e-6)
    assert_ema_close(learn.model, reference_ema(snaps.initial, snaps.steps, decays))
    # and the switch changed training: the same fit without it ends elsewhere
    plain = fit_quiet(synth_learner(cbs=cb().__class__(**{**_args(cb()), 'switch': False})), 3)
    assert not torch.equal(plain.model[0].weight, learn.model[0].weight)

def _args(cb) -> dict:
    if isinstance(cb, EMASchedule): return dict(start_decay=0.5, final_decay=0.9, finish=0.5, update_every=2)
    return dict(decay=0.8)

def test_switch_resumes_exactly(tmp_path):
    "A fit resumed from an epoch's checkpoint ends as the uninterrupted one: model and EMA, bit for bit"
    full = synth_learner(cbs=EMACallback(decay=0.8, switch=True), path=tmp_path)
    with full.no_bar(), full.no_logging(): full.fit_one_cycle(3, cbs=SaveModelCallback(every_epoch=True, with_opt=True))
    resumed = synth_learner(cbs=EMACallback(decay=0.8, switch=True), path=tmp_path)
    resumed.load('model_0')
    with resumed.no_bar(), resumed.no_logging(): resumed.fit_one_cycle(3, start_epoch=1)
    assert_same_state(resumed.model, full.model)
    assert_same_state(resumed.model_ema, full.model_ema)

def test_switch_is_checked():
    with pytest.raises(TypeError, match='switch'): EMACallback(switch='yes')
