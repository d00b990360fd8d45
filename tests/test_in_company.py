"""Issue 17: the EMA holders next to fastai's own callbacks, model families and workflows.

Each test states a claim a fastai user relies on; each failed on the code before the holder registry and the single
validation path (`validate_weights`). Models come from fastai's own factories with `pretrained=False`, on data made here.
"""
import re, warnings
from copy import deepcopy
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastai.learner import Learner
from fastai.torch_core import params
from fastai.losses import MSELossFlat
from fastai.metrics import mae, accuracy
from fastcore.test import test_eq as _eq, test_close as _close_t
from fastai.callback.training import GradientAccumulation
from fastai.callback.tracker import SaveModelCallback
from fastxtend_ema.callback import (EMACallback, EMASchedule, EMAHorizonWarning, EMAMetricValue, validate_weights,
                                    ema_holders)
from fastxtend_ema.posthoc import PostHocEMA
from fastxtend_ema.test_utils import (synth_learner, synth_model, fit_quiet, valid_loss, Snapshots, reference_ema,
                                      assert_same_state, assert_ema_close)

pytestmark = pytest.mark.filterwarnings('ignore::fastxtend_ema.callback.EMAHorizonWarning')


def _close(a, b, eps=1e-5): assert abs(a - b) <= eps*max(1., abs(b)), (a, b)

def _cols(learn) -> dict:
    "The last epoch's Recorder row, by column name"
    return dict(zip(learn.recorder.metric_names[1:], learn.recorder.values[-1]))


# -- 1. EMA scores come from fastai's own validation ---------------------------------------------------------------

class Rescale(Callback):
    "Transforms every batch's input, as normalising or channels-last callbacks do"
    order = 5
    def before_batch(self): self.learn.xb = tuple(x*0.5 for x in self.xb)

class CPUAutocast(Callback):
    "bf16 autocast around the forward, as fastai's MixedPrecision does on a GPU (its CUDA autocast is off on a CPU)"
    order = 10
    def before_batch(self): self.ctx = torch.autocast('cpu', torch.bfloat16); self.ctx.__enter__()
    def after_pred(self): self.learn.pred = self.pred.float(); self.ctx.__exit__(None, None, None)
    def after_loss(self): pass

@pytest.mark.parametrize('extra', [Rescale, CPUAutocast], ids=['batch-transform', 'autocast'])
def test_both_columns_equal_validation_on_the_ema(extra):
    "`ema_valid_loss` and `ema_<metric>` equal what `validate_ema=True` records for the same EMA"
    both = fit_quiet(synth_learner(cbs=[extra(), EMACallback(decay=0.8, validate_ema='both')], metrics=mae), 2)
    true = fit_quiet(synth_learner(cbs=[extra(), EMACallback(decay=0.8)], metrics=mae), 2)
    assert_same_state(both.model_ema, true.model_ema)
    b,t = _cols(both),_cols(true)
    _close(b['ema_valid_loss'], t['valid_loss']); _close(b['ema_mae'], t['mae'])
    # and what fastai's own validate gives with the EMA weights loaded into the model
    plain = synth_learner(cbs=extra(), metrics=mae)
    plain.model.load_state_dict(both.model_ema.state_dict())
    with plain.no_bar(), plain.no_logging(): res = plain.validate()
    _close(b['ema_valid_loss'], res[0]); _close(b['ema_mae'], res[1])

def test_validate_weights_keeps_the_recorder_and_runs_batch_events():
    "`validate_weights` (and `PostHocEMA.validate_module`) runs fastai's loop with its events and keeps the fit's history"
    learn = fit_quiet(synth_learner(cbs=[Rescale(), PostHocEMA(snapshot_every=3)], metrics=mae), 2)
    values,names = deepcopy(learn.recorder.values),list(learn.recorder.metric_names)
    m = learn.post_hoc_ema.synthesize(0.1)
    res = learn.post_hoc_ema.validate_module(m)
    plain = synth_learner(cbs=Rescale(), metrics=mae)
    plain.model.load_state_dict(m.state_dict())
    with plain.no_bar(), plain.no_logging(): ref = plain.validate()
    _close(res[0], ref[0]); _close(res[1], ref[1])
    assert learn.recorder.values == values and list(learn.recorder.metric_names) == names
    assert learn.recorder in learn.cbs and learn.recorder.learn is learn

def test_validate_and_get_preds_stay_fastais():
    "After a fit with EMA columns, `learn.validate()` and `get_preds()` score the training weights, as fastai does"
    learn = fit_quiet(synth_learner(cbs=EMACallback(decay=0.8, validate_ema='both'), metrics=mae), 2)
    with learn.no_bar(), learn.no_logging(): res = learn.validate()
    _close(res[0], valid_loss(learn.model, learn.dls))
    _eq(len(res), 2)   # the loss and mae: no EMA columns outside the fit
    preds,_ = learn.get_preds()
    x = torch.cat([b[0] for b in learn.dls.valid])
    with torch.no_grad(): _close_t(preds, learn.model.eval()(x), eps=1e-6)


def _text_df(n=64, seed=0):
    rng = np.random.default_rng(seed)
    words = ['good', 'bad', 'great', 'awful', 'fine', 'poor', 'nice', 'sad']
    rows = [(' '.join(rng.choice(words[i%2::2], 6).tolist() + rng.choice(words, 4).tolist()), 'pos' if i%2 == 0 else 'neg')
            for i in range(n)]
    return pd.DataFrame(rows, columns=['text', 'label'])

@pytest.fixture(scope='module')
def text_dls(tmp_path_factory):
    from fastai.text.all import TextBlock, CategoryBlock, DataBlock, ColReader, IndexSplitter, BaseTokenizer
    path,df = tmp_path_factory.mktemp('text'),_text_df()
    tb = lambda **kw: TextBlock.from_df('text', tok=BaseTokenizer(), n_workers=0, min_freq=1, **kw)
    clas = DataBlock(blocks=(tb(), CategoryBlock), get_x=ColReader('text'), get_y=ColReader('label'),
                     splitter=IndexSplitter(range(48, 64))).dataloaders(df, bs=8, path=path)
    lm = DataBlock(blocks=tb(is_lm=True, seq_len=8), get_x=ColReader('text'),
                   splitter=IndexSplitter(range(48, 64))).dataloaders(df, bs=4, seq_len=8, path=path)
    return clas,lm

@pytest.mark.parametrize('kind', ['classifier', 'language_model'])
def test_awd_lstm_both_columns(text_dls, kind):
    "fastai's AWD-LSTM learners run with `validate_ema='both'` (RNNCallback, ModelResetter fire for the EMA pass)"
    from fastai.text.all import text_classifier_learner, language_model_learner, AWD_LSTM, awd_lstm_clas_config, awd_lstm_lm_config
    small = dict(emb_sz=16, n_hid=24, n_layers=1)
    def make(cb):
        torch.manual_seed(0)
        if kind == 'classifier':
            return text_classifier_learner(text_dls[0], AWD_LSTM, pretrained=False, config={**awd_lstm_clas_config, **small},
                                           metrics=accuracy, cbs=cb)
        return language_model_learner(text_dls[1], AWD_LSTM, pretrained=False, config={**awd_lstm_lm_config, **small},
                                      metrics=accuracy, cbs=cb)
    learn = fit_quiet(make(EMACallback(decay=0.8, validate_ema='both')), 1)
    b = _cols(learn)
    # fastai's own validate, on the training model with the EMA's weights loaded (eval mode: no dropout, hidden state reset)
    keep = deepcopy(learn.model.state_dict())
    learn.model.load_state_dict(learn.model_ema.state_dict())
    with learn.no_bar(), learn.no_logging(): ref = learn.validate()
    learn.model.load_state_dict(keep)
    _close(b['ema_valid_loss'], ref[0], eps=1e-4); _close(b['ema_accuracy'], ref[1], eps=1e-4)
    assert abs(b['ema_valid_loss'] - b['valid_loss']) > 1e-6   # two different models were scored


# -- 2. Several EMAs on one Learner --------------------------------------------------------------------------------

def test_the_validating_holder_is_the_one_validated_on():
    "With `EMASchedule(validate_ema=True)` and `PostHocEMA` (either order), the recorded loss is the schedule's EMA's"
    for cbs in ([EMASchedule(0.5, 0.9), PostHocEMA(snapshot_every=3)], [PostHocEMA(snapshot_every=3), EMASchedule(0.5, 0.9)]):
        learn = fit_quiet(synth_learner(cbs=cbs), 2)
        _close(learn.recorder.values[-1][1], valid_loss(learn.model_ema, learn.dls))
    learn = fit_quiet(synth_learner(cbs=[PostHocEMA(validate_on=0.1, snapshot_every=3), EMACallback(decay=0.8, validate_ema=False)]), 2)
    _close(learn.recorder.values[-1][1], valid_loss(learn.post_hoc_ema.emas[1].module, learn.dls))

def test_two_validation_claims_are_refused_naming_both():
    "More than one holder asking to be validated on is an error naming both, before anything changes"
    with pytest.raises(ValueError, match=r"EMACallback\(decay=0.9, name='ema'\) and PostHocEMA\(.*\) both ask"):
        synth_learner(cbs=[EMACallback(decay=0.9), PostHocEMA(validate_on=0.1)])
    learn = synth_learner(cbs=[EMACallback(decay=0.9), PostHocEMA()])
    learn.post_hoc_ema.validate_on = 0.1   # changed after adding: refused at before_fit, nothing set up
    with pytest.raises(ValueError, match='both ask'): fit_quiet(learn, 1)
    assert learn.ema.averager is None and learn.post_hoc_ema.emas == []

def test_duplicates_are_refused_naming_both():
    "A second EMA callback that would write the same attributes and file is refused, naming both; the Learner unchanged"
    learn = synth_learner(cbs=EMACallback(decay=0.99))
    cbs = list(learn.cbs)
    with pytest.raises(ValueError, match=r"EMACallback\(decay=0.99, name='ema'\) and EMACallback\(decay=0.9, name='ema'\) would both write learn.ema"):
        learn.fit(1, cbs=EMACallback(decay=0.9))
    assert list(learn.cbs) == cbs and learn.ema.decay == 0.99
    with pytest.raises(ValueError, match='learn.model_ema'): synth_learner(cbs=[EMACallback(), EMASchedule()])

def test_named_holders_coexist_and_round_trip(tmp_path):
    "Named holders have their own attributes, columns and checkpoint files; save/load round-trips every one exactly"
    def make(): return synth_learner(cbs=[EMACallback(decay=0.9, validate_ema='both'),
                                          EMASchedule(0.5, 0.99, name='slow', validate_ema='both'),
                                          PostHocEMA(snapshot_every=4)], path=tmp_path, metrics=mae)
    learn = fit_quiet(make(), 2)
    assert learn.slow is learn.cbs.filter(lambda c: isinstance(c, EMASchedule))[0]
    assert not torch.equal(learn.model_ema[0].weight, learn.model_slow[0].weight)
    cols = _cols(learn)
    _close(cols['ema_valid_loss'], valid_loss(learn.model_ema, learn.dls))
    _close(cols['slow_valid_loss'], valid_loss(learn.model_slow, learn.dls))
    learn.save('ck')
    assert {p.name for p in (tmp_path/'models').glob('ck.*')} == {'ck.pth', 'ck.ema.pth', 'ck.slow.pth', 'ck.posthoc.pth'}
    back = make()
    back.load('ck')
    assert_same_state(back.model_ema, learn.model_ema)
    assert_same_state(back.model_slow, learn.model_slow)
    _eq((back.ema.updates, back.slow.updates), (learn.ema.updates, learn.slow.updates))
    for a,b in zip(back.post_hoc_ema.emas, learn.post_hoc_ema.emas): assert_same_state(a.module, b.module)

def test_bad_names_are_refused():
    for name,err in ((3, TypeError), ('a b', TypeError), ('model', ValueError), ('dir', ValueError), ('recorder', ValueError)):
        with pytest.raises(err, match='name'): EMACallback(name=name)


# -- 4. Workflows that change the model during a fit ---------------------------------------------------------------

class UnfreezeAt(Callback):
    "Gradual unfreezing: makes the first layer trainable at the start of epoch `epoch`"
    def __init__(self, epoch): self.at = epoch
    def before_epoch(self):
        if self.epoch == self.at: self.learn.unfreeze()

@pytest.mark.parametrize('holder', ['ema', 'posthoc'])
def test_weights_unfrozen_inside_a_fit_are_averaged(holder):
    "Weights that start training inside a fit are averaged from then on (float64 reference), not copied"
    snaps = FirstLayer()
    cb = EMACallback(decay=0.8) if holder == 'ema' else PostHocEMA(sigma_rels=0.1, snapshot_every=100)
    learn = synth_learner(cbs=[UnfreezeAt(1), cb, snaps], splitter=lambda m: [params(m[0]), params(m[1:])])
    learn.freeze()   # fastai's way: the body's group frozen, its optimizer holding every group
    fit_quiet(learn, 3)
    if holder == 'ema': decays,ema = [0.8]*18,learn.model_ema
    else:
        from fastxtend_ema.posthoc import power_beta, sigma_rel_to_gamma
        decays,ema = [power_beta(t, 1, sigma_rel_to_gamma(0.1)) for t in range(1, 19)],learn.post_hoc_ema.emas[0].module
    ref = reference_ema(snaps.initial, snaps.steps, decays)   # the frozen epoch's weights are constant: the same EMA
    assert not torch.equal(learn.model[0].weight.detach(), ema[0].weight)
    _close_t(ema[0].weight.double(), ref['0.weight'], eps=1e-5)

class FirstLayer(Snapshots):
    "`Snapshots` of the first layer's weight, trainable or not"
    def before_fit(self): self.names,self.steps = ['0.weight'],[]; self.initial = self._snap()


class Stop(Callback):
    "Ends the fit in the given epoch's validation, with `exc`"
    def __init__(self, exc, epoch=1): self.exc,self.at = exc,epoch
    def after_train(self):
        if self.epoch == self.at: raise self.exc

def test_fit_state_from_events_after_a_crash(tmp_path):
    "A load after a fit that ended in an exception is a load between fits: the next fit continues from it"
    learn = fit_quiet(synth_learner(cbs=EMACallback(decay=0.9), path=tmp_path), 1)
    learn.save('ck'); saved = deepcopy(learn.model_ema.state_dict())
    learn.add_cb(Stop(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt): fit_quiet(learn, 3)
    learn.remove_cb(Stop)
    assert not learn.ema.averager.swapped
    learn.load('ck')
    snaps = Snapshots(); learn.add_cb(snaps)
    fit_quiet(learn, 1)
    _eq(learn.ema.updates, 12)   # 6 from the checkpoint, 6 more
    assert_ema_close(learn.model_ema, reference_ema({n:saved[n].double() for n in snaps.names}, snaps.steps, [0.9]*6))

def test_cancel_fit_then_load_continues(tmp_path):
    "CancelFitException ends the fit through `after_fit`; a load after it is between fits"
    learn = fit_quiet(synth_learner(cbs=EMACallback(decay=0.9), path=tmp_path), 1)
    learn.save('ck')
    learn.add_cb(Stop(CancelFitException()))
    fit_quiet(learn, 3); learn.remove_cb(Stop)
    learn.load('ck')
    fit_quiet(learn, 1)
    _eq(learn.ema.updates, 12)

def test_nothing_reads_fastais_frames():
    "No frame's locals are read (the warning's stacklevel counts frames by file name only)"
    src = '\n'.join(p.read_text() for p in (Path(__file__).parents[1]/'fastxtend_ema').glob('*.py'))
    assert 'f_locals' not in src and '_with_events' not in src
    _eq(src.count('sys._getframe'), 1)


# -- 5. Messages a fastai user can act on --------------------------------------------------------------------------

def test_unknown_keyword_names_the_class_and_the_close_name():
    with pytest.raises(TypeError, match=r"EMASchedule\(\) got an unexpected keyword argument 'end_decay' \(did you mean 'final_decay'\?\); it takes: start_decay, final_decay"):
        EMASchedule(end_decay=0.99)
    with pytest.raises(TypeError, match=r"EMACallback\(\) got an unexpected keyword argument 'end_decay' \(did you mean 'decay'\?\)"):
        EMACallback(end_decay=0.99)
    with pytest.raises(TypeError, match=r"PostHocEMA\(\) .* 'sigma_rel' \(did you mean 'sigma_rels'\?\)"):
        PostHocEMA(sigma_rel=0.1)

def test_horizon_warning_points_at_the_users_line():
    learn = synth_learner(cbs=EMACallback())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(1)   # this line
    hw = [o for o in w if issubclass(o.category, EMAHorizonWarning)]
    _eq(len(hw), 1)
    _eq(Path(hw[0].filename).resolve(), Path(__file__).resolve())

def test_horizon_warning_for_a_schedule_that_lags():
    "EMASchedule(0.9, 0.99) on a one-epoch fit of 84 steps warns: its EMA's weighted age is most of the fit"
    from fastxtend_ema.test_utils import synth_dls
    learn = Learner(synth_dls(n_train=84*4, bs=4), synth_model(), loss_func=MSELossFlat(), cbs=EMASchedule(0.9, 0.99))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); fit_quiet(learn, 1)
    msgs = [str(o.message) for o in w if issubclass(o.category, EMAHorizonWarning)]
    _eq(len(msgs), 1)
    assert '84 optimizer steps' in msgs[0] and 'final_decay=' in msgs[0]

def test_posthoc_arguments_are_named():
    with pytest.raises(TypeError, match='sigma_rels'): PostHocEMA(sigma_rels=None)
    learn = fit_quiet(synth_learner(cbs=PostHocEMA(snapshot_every=3)), 1)
    with pytest.raises(TypeError, match='sigma_rel must be one width'): learn.post_hoc_ema.synthesize([0.05, 0.1])


# -- issue 21, items 2 and 3 ---------------------------------------------------------------------------------------

def test_start_at_the_end_of_the_fit_does_not_start():
    "`start` at the end of the fit: the EMA does not start (as the warning says), and the next fit's start is its own"
    cb = EMACallback(decay=0.9, start=1, resume=True)
    learn = synth_learner(cbs=cb)
    with pytest.warns(UserWarning, match='does not start'): fit_quiet(learn, 1)   # fine_tune's frozen fit
    assert not hasattr(learn, 'model_ema') and cb.updates == 0
    snaps = Snapshots(); learn.add_cb(snaps)
    fit_quiet(learn, 2)   # the unfrozen fit: starts at its epoch 1
    _eq(cb.updates, 6)
    assert_ema_close(learn.model_ema, reference_ema(snaps.steps[5], snaps.steps[6:], [0.9]*6))

def test_a_fit_of_no_epochs():
    "`fine_tune(n, freeze_epochs=0)` runs a fit of 0 epochs first: it leaves the EMA alone"
    learn = fit_quiet(synth_learner(cbs=EMACallback(decay=0.9)), 1)
    ema = learn.model_ema
    fit_quiet(learn, 0)
    assert learn.model_ema is ema and learn.ema.updates == 6
