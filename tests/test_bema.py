"""Reference tests for `BEMACallback` (issue 19).

The BEMA is recomputed here in float64 from per-batch snapshots of the training weights, following the definition in
the issue (the paper's Algorithm 1), written apart from the package on purpose:

* at the start (`start`, the first batch whose progress is at least `start`), `theta_0` is the weights and the EMA starts
  equal to them;
* `t` counts the optimizer steps that happened since; updates at `t = k, 2k, ...` (`update_every=k`):
  `ema = (1 - beta)*ema + beta*theta_t`, `beta = max((lag + multiplier*t)**-ema_power, min_ema_multiplier)`;
* the BEMA weights are `ema + alpha*(theta - theta_0)` with `alpha = (lag + multiplier*t)**-bias_power` at the latest
  update's `t` and `theta` the current weights (1 before any update); floating buffers (BatchNorm statistics) get no
  correction: the BEMA weights hold the training model's.

The three other public variants (TRL, the authors' online and offline code) are written here from their formulas, and
the tests check how much they differ from the definition and that the migration table's arguments reproduce them.
"""
import copy, warnings

import pytest
import torch
from torch import nn

from fastai.basics import Learner, Callback, MSELossFlat, SGD
from fastai.callback.core import CancelStepException
from fastai.callback.training import GradientAccumulation

from fastxtend_ema import BEMACallback
from fastxtend_ema.test_utils import synth_dls, synth_model, valid_loss

pytestmark = pytest.mark.filterwarnings('ignore')

N_TRAIN, BS = 64, 16
N_ITER = N_TRAIN // BS   # 4 training batches an epoch


# ----------------------------------------------------------------------------- the test bed

class Cast(nn.Module):
    def __init__(self, dt):
        super().__init__()
        self.dt = dt
    def forward(self, x): return x.to(self.dt)

def make_model(bf16=False):
    m = synth_model(1)   # BatchNorm, and a frozen parameter (the last bias)
    if not bf16: return m
    return nn.Sequential(Cast(torch.bfloat16), *m.to(torch.bfloat16), Cast(torch.float32))

def make_learner(cbs, bf16=False, path=None, lr=0.05):
    return Learner(synth_dls(n_train=N_TRAIN, n_valid=32, bs=BS), make_model(bf16), loss_func=MSELossFlat(),
                   opt_func=SGD, lr=lr, cbs=cbs, path=path)

def fit(learn, n_epoch, **kwargs):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(n_epoch, **kwargs)
    return learn

def sd64(model):
    return {k: v.detach().to(torch.float64, copy=True) for k, v in model.state_dict().items() if v.is_floating_point()}

class Rec(Callback):
    "Per training batch: exact progress at its start, whether an optimizer step happened, the weights after it"
    order = 100
    def __init__(self, keep=False): self.keep = keep   # keep: one series over several fits
    def before_fit(self):
        if self.keep and hasattr(self, 'recs'): return
        m = self.learn.model
        self.init, self.recs, self.epoch_ends = sd64(m), [], []
        self.params = {n for n, p in m.named_parameters() if p.requires_grad}
        self.buffers = {n for n, b in m.named_buffers() if b.is_floating_point()}
    def before_batch(self):
        if self.learn.training: self.pct, self.stepped, self.cancelled = self._pct(), False, False
    def _pct(self): return (self.learn.epoch*self.learn.n_iter + self.learn.iter)/(self.learn.n_epoch*self.learn.n_iter)
    def after_cancel_step(self): self.cancelled = True
    def after_step(self): self.stepped = not self.cancelled
    def after_batch(self):
        if self.learn.training: self.recs.append(dict(pct=self.pct, stepped=self.stepped, w=sd64(self.learn.model)))
    def after_train(self): self.epoch_ends.append(len(self.recs))

def definition(rec, ema_power=0.5, bias_power=0.2, lag=10., multiplier=1., start=0., every=1, min_mult=0., upto=None,
               beta_of=None, alpha_of=None, start_at=None):
    """float64 BEMA from the definition: (EMA, BEMA) by tensor name. `beta_of`/`alpha_of` (functions of `t`) replace
    the definition's weights, for the other variants; `start_at`: the record index the EMA starts before, instead of `start`"""
    beta_of = beta_of or (lambda t: max((lag + multiplier*t)**-ema_power, min_mult))
    alpha_of = alpha_of or (lambda t: (lag + multiplier*t)**-bias_power)
    names = sorted(rec.params | rec.buffers)
    ema = theta0 = None
    t = t_last = 0
    prev = rec.init
    for i, r in enumerate(rec.recs[:upto]):
        if ema is None and (r['pct'] + 1e-9 >= start if start_at is None else i >= start_at):
            theta0 = {n: prev[n].clone() for n in names}
            ema = {n: prev[n].clone() for n in names}
        if ema is not None and r['stepped']:
            t += 1
            if t % every == 0:
                beta = beta_of(t)
                ema = {n: (1 - beta)*ema[n] + beta*r['w'][n] for n in names}
                t_last = t
        prev = r['w']
    alpha = 1. if t_last == 0 else alpha_of(t_last)
    bema = {n: ema[n] + alpha*(prev[n] - theta0[n]) if n in rec.params else prev[n].clone() for n in names}
    return ema, bema

def close(module, ref, eps=1e-5):
    "Every tensor of `ref` matches `module`'s: the largest difference"
    sd = module.state_dict()
    assert ref and set(ref) <= set(sd)
    diff = max((sd[n].double() - ref[n]).abs().max().item() for n in ref)
    assert diff < eps, diff
    return diff

def gap(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)

def run(n_epoch=3, extra=(), bf16=False, **kwargs):
    cb, rec = BEMACallback(**kwargs), Rec()
    learn = fit(make_learner([cb, rec, *extra], bf16=bf16), n_epoch)
    return learn, cb, rec


# ----------------------------------------------------------------------------- the definition, step by step

@pytest.mark.parametrize('every', [1, 3])
def test_equals_the_definition(every):
    "16 steps: with update_every=3 the last update is at t=15 and the final weights are one step further"
    learn, cb, rec = run(4, update_every=every)
    ema, bema = definition(rec, every=every)
    close(learn.model_ema, bema)
    close(cb.ema_module, ema)
    assert cb.steps == 16 and cb.updates == 16//every
    assert gap(ema, bema) > 1e-2   # the correction is not negligible here: the test can tell BEMA from its EMA

def test_a_wrong_rescale_or_clock_would_be_caught():
    "The reference tells the definition from what a mutant would do: `decay**update_every`, or alpha at the final step"
    learn, cb, rec = run(4, update_every=3)
    _, bema = definition(rec, every=3)
    _, rescaled = definition(rec, every=3, beta_of=lambda t: 1 - (1 - (10 + t)**-0.5)**3)
    _, alpha_final = definition(rec, every=3, alpha_of=lambda t: (10 + 16)**-0.2)
    assert gap(bema, rescaled) > 1e-3 and gap(bema, alpha_final) > 1e-4

class CancelSome(Callback):
    "Cancels the optimizer step of every third training batch"
    order = 50
    def before_step(self):
        if self.learn.iter % 3 == 1: raise CancelStepException()

@pytest.mark.parametrize('skipper', ['accumulation', 'cancel'])
def test_only_steps_that_happened_count(skipper):
    extra = [GradientAccumulation(n_acc=2*BS)] if skipper == 'accumulation' else [CancelSome()]
    learn, cb, rec = run(3, extra=extra)
    stepped = sum(r['stepped'] for r in rec.recs)
    assert 0 < stepped < len(rec.recs) and cb.steps == stepped
    _, bema = definition(rec)
    close(learn.model_ema, bema)

@pytest.mark.parametrize('start', [0.3, 1])
def test_start_as_a_fraction_and_as_an_epoch(start):
    learn, cb, rec = run(3, start=start)
    frac = start if isinstance(start, float) else start/3
    _, bema = definition(rec, start=frac)
    close(learn.model_ema, bema)
    assert cb.steps == sum(r['pct'] + 1e-9 >= frac for r in rec.recs)

def test_min_ema_multiplier():
    learn, cb, rec = run(3, min_ema_multiplier=0.25)
    _, bema = definition(rec, min_mult=0.25)
    close(learn.model_ema, bema)
    _, unfloored = definition(rec)
    assert gap(bema, unfloored) > 1e-3

def test_bf16_model_keeps_an_fp32_state():
    learn, cb, rec = run(3, bf16=True)
    assert next(learn.model.parameters()).dtype == torch.bfloat16
    assert all(z.dtype == torch.float32 for z in cb._theta0)
    averaged = rec.params | rec.buffers   # the frozen bias is copied, in the model's dtype
    for m in (cb.ema_module, learn.model_ema):
        assert all(t.dtype == torch.float32 for n, t in m.state_dict().items() if n in averaged)
    ema, bema = definition(rec)
    close(cb.ema_module, ema)
    close(learn.model_ema, bema)

def test_validation_scores_are_the_bema_weights_loss():
    cb, rec = BEMACallback(), Rec()
    learn = make_learner([cb, rec])
    with learn.no_bar(), learn.no_logging(): learn.fit(3)
    vals = [v[1] for v in learn.recorder.values]
    assert len(vals) == 3
    for e, end in enumerate(rec.epoch_ends):
        _, bema = definition(rec, upto=end)
        m = copy.deepcopy(learn.model)
        m.load_state_dict({**m.state_dict(), **{n: v.float() for n, v in bema.items()}})
        assert abs(vals[e] - valid_loss(m, learn.dls)) < 1e-5*max(1, vals[e]), (e, vals[e])

def test_validate_ema_both_shows_raw_and_bema():
    cb = BEMACallback(validate_ema='both')
    learn = make_learner([cb])
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    names = list(learn.recorder.metric_names)
    v = learn.recorder.values[-1]
    raw, bema = v[names.index('valid_loss')-1], v[names.index('ema_valid_loss')-1]
    assert abs(raw - valid_loss(learn.model, learn.dls)) < 1e-5*max(1, raw)
    assert abs(bema - valid_loss(learn.model_ema, learn.dls)) < 1e-5*max(1, bema)


# ----------------------------------------------------------------------------- checkpoints and resume

class SaveAt(Callback):
    order = 90
    def __init__(self, epoch, file): self.at, self.file = epoch, file
    def after_epoch(self):
        if self.epoch == self.at: self.learn.save(self.file)

@pytest.mark.parametrize('every', [1, 3])
def test_save_load_mid_fit_resumes_exactly(every, tmp_path):
    "Saved after epoch 2 of 4, loaded into a new Learner that fits epochs 3 and 4: the same as the uninterrupted fit"
    whole = fit(make_learner([BEMACallback(update_every=every), SaveAt(1, 'mid')], path=tmp_path), 4)
    cb = BEMACallback(update_every=every)
    back = make_learner([cb], path=tmp_path)
    back.load('mid')
    assert cb._t == 8 - 8 % every and cb.steps == 8
    fit(back, 4, start_epoch=2)
    for a, b in ((back.model_ema, whole.model_ema), (cb.ema_module, whole.bema.ema_module), (back.model, whole.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (cb.steps, cb.updates, cb._t) == (whole.bema.steps, whole.bema.updates, whole.bema._t)

def test_checkpoint_holds_theta0_and_counters(tmp_path):
    learn, cb, rec = run(2, update_every=3)
    learn.path = tmp_path
    learn.save('x')
    s = torch.load(tmp_path/'models'/'x.bema.pth', weights_only=True)
    assert s['format'] == 1 and s['t'] == 6 and s['ema']['steps'] == 8 and s['ema']['updates'] == 2 and s['alpha'] == (10 + 6)**-0.2
    theta0 = {n: v for n, v in rec.init.items() if n in rec.params | rec.buffers}
    assert set(s['theta0']) == set(theta0) and all(torch.equal(s['theta0'][n].double(), theta0[n]) for n in theta0)
    assert not (tmp_path/'models'/'x.ema.pth').exists()

def test_resume_continues_theta0_and_the_clock():
    "Two fits with resume=True are one BEMA over both: theta_0 from the first fit's start, t counting on"
    cb, rec = BEMACallback(resume=True), Rec(keep=True)
    learn = make_learner([cb, rec])
    fit(learn, 2); fit(learn, 2)
    assert cb.steps == 16
    rec.recs = [dict(r, pct=0.) for r in rec.recs]   # one series: the start is the first batch
    _, bema = definition(rec)
    close(learn.model_ema, bema)

def test_without_resume_a_second_fit_starts_anew():
    cb, rec = BEMACallback(), Rec()
    learn = make_learner([cb, rec])
    fit(learn, 1); fit(learn, 2)
    _, bema = definition(rec)
    close(learn.model_ema, bema)


# ----------------------------------------------------------------------------- the other variants, and the migration table

TAU = N_ITER   # a burn-in of one epoch, in steps: `start=1`

def variant(rec, name, rho=10., gamma=1., kappa=0.5, eta=0.2, tau=TAU):
    "float64 BEMA of another implementation, from its formulas, with `T = tau + t` the steps since training started"
    forms = {
        'paper':   (lambda t: (rho + gamma*t)**-kappa, lambda t: (rho + gamma*t)**-eta),
        'TRL':     (lambda t: (rho + gamma*(tau + t))**-kappa, lambda t: (rho + gamma*(tau + t))**-eta),
        'online':  (lambda t: gamma*(1 + max(0, tau + t - rho))**-kappa, lambda t: gamma*(1 + max(0, tau + t - rho))**-eta),
        'offline': (lambda t: (1 + gamma*max(t + rho, 1))**-kappa, lambda t: (1 + max(t + rho, 1))**-eta),
    }
    beta, alpha = forms[name]
    return definition(rec, beta_of=beta, alpha_of=alpha, start_at=tau)[1]

@pytest.fixture(scope='module')
def default_fit():
    "BEMACallback with its defaults and a burn-in of one epoch"
    learn, cb, rec = run(4, start=1)
    return learn, rec

# (variant, its parameters, the arguments the migration table gives; None: impossible)
TABLE = [
    ('paper', dict(rho=10.), dict(lag=10.)),
    ('TRL', dict(rho=10.), dict(lag=10. + TAU)),
    ('online', dict(rho=3.), dict(lag=1. + TAU - 3.)),
    ('offline', dict(rho=10.), dict(lag=11.)),
    ('online', dict(rho=10.), None),             # its defaults: rho > tau + 1
    ('online', dict(rho=3., gamma=2.), None),
    ('offline', dict(rho=10., gamma=2.), None),
]

@pytest.mark.parametrize('name,params,args', TABLE, ids=[f'{n}-{p}' for n, p, _ in TABLE])
def test_variants_differ_and_the_table_maps_them(default_fit, name, params, args):
    learn, rec = default_fit
    theirs = variant(rec, name, **params)
    by_defaults = close(learn.model_ema, definition(rec, start_at=TAU)[1])   # the fit itself is the definition
    diff = gap(theirs, definition(rec, start_at=TAU)[1])
    if name == 'paper': assert diff == 0   # the paper's formula is the definition
    else: assert diff > 1e-4, diff   # the weights of the fit differ by this much from BEMACallback's defaults
    if args is None: return
    learn2, cb, rec2 = run(4, start=1, **args)
    close(learn2.model_ema, variant(rec2, name, **params))


# ----------------------------------------------------------------------------- the rest of EMACallback's contract

def test_replace_weights_writes_the_bema_weights():
    learn, cb, rec = run(2, replace_weights=True)
    _, bema = definition(rec)
    close(learn.model, bema)
    close(learn.model_ema, bema)

def test_validate_and_get_preds_after_fit_leave_bema_alone():
    "`learn.validate()` runs before_fit/after_fit: it scores the training weights and changes no BEMA state"
    learn, cb, rec = run(2)
    before = {k: v.clone() for k, v in learn.model_ema.state_dict().items()}
    state = (cb.steps, cb.updates, cb._t, [z.clone() for z in cb._theta0])
    loss = learn.validate()[0]
    assert abs(loss - valid_loss(learn.model, learn.dls)) < 1e-5*max(1, loss)
    assert all(torch.equal(before[k], v) for k, v in learn.model_ema.state_dict().items())
    assert (cb.steps, cb.updates, cb._t) == state[:3] and all(torch.equal(a, b) for a, b in zip(cb._theta0, state[3]))

def test_start_after_the_end_leaves_model_ema_alone():
    learn, cb, rec = run(1, start=2)
    assert not cb.started and getattr(learn, 'model_ema', None) is None

def test_load_bema_weights_forms_the_saved_bema_for_inference(tmp_path):
    "Saved mid-fit (update_every=3: the saved weights are 2 steps past the latest update), loaded with no callback"
    from fastxtend_ema.bema import load_bema_weights
    cb, rec = BEMACallback(update_every=3), Rec()
    fit(make_learner([cb, rec, SaveAt(1, 'mid')], path=tmp_path), 3)
    _, bema = definition(rec, every=3, upto=rec.epoch_ends[1])
    infer = make_learner([], path=tmp_path)
    load_bema_weights(infer, 'mid')
    close(infer.model, bema)

def test_no_horizon_warning():
    "EMACallback's horizon warning is about the lag the correction removes: BEMA never emits it, even with a huge lag"
    from fastxtend_ema import EMAHorizonWarning
    cb = BEMACallback(lag=1e6)
    learn = make_learner([cb])
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('error', EMAHorizonWarning)
        learn.fit(1)
    assert cb.steps == N_ITER

def test_resume_from_a_model_ema_it_did_not_make_starts_anew():
    "A `learn.model_ema` set by hand holds no theta_0: BEMA says so and starts from the model's weights"
    cb, rec = BEMACallback(resume=True), Rec()
    learn = make_learner([cb, rec])
    learn.model_ema = make_model()
    with learn.no_bar(), learn.no_logging(), pytest.warns(UserWarning, match='starts anew'): learn.fit(2)
    _, bema = definition(rec)
    close(learn.model_ema, bema)
