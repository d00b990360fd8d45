"""Independent reference tests for `fastxtend_ema` (EMACallback / EMASchedule).

Every expected EMA is recomputed here in float64 from per-batch snapshots of the training weights, following the
written spec, and compared with `learn.model_ema`. The reference below is written apart from `test_utils.reference_ema`
on purpose: two independent implementations of the spec agreeing with the package. The Learner is the shared one.
"""
import copy, functools, math, warnings

import pytest
import torch
from torch import nn

from fastai.basics import Learner, Callback, DataLoaders, MSELossFlat, SGD
from fastai.data.load import DataLoader
from fastai.callback.core import CancelStepException
from fastai.callback.training import GradientAccumulation

from fastxtend_ema import EMACallback, EMASchedule, SchedCos, SchedLin, SchedExp, SchedPoly
from fastxtend_ema.test_utils import synth_dls, synth_model

pytestmark = pytest.mark.filterwarnings('ignore')

N_TRAIN, N_VALID, NF, BS = 64, 32, 4, 16
N_ITER = N_TRAIN // BS  # 4 training batches per epoch


# ----------------------------------------------------------------------------- fixtures / helpers

def make_dls(seed=0):
    "The test bed of `fastxtend_ema.test_utils`, 64 training rows: 4 batches an epoch, not shuffled"
    return synth_dls(n_train=N_TRAIN, n_valid=N_VALID, bs=BS, seed=seed)


def make_model(seed=1):
    return synth_model(seed)   # BatchNorm, and a frozen parameter (the last bias)


class Cast(nn.Module):
    def __init__(self, dt):
        super().__init__()
        self.dt = dt

    def forward(self, x): return x.to(self.dt)


def make_bf16_model(seed=1):
    m = make_model(seed).to(torch.bfloat16)
    return nn.Sequential(Cast(torch.bfloat16), *m, Cast(torch.float32))


def make_learner(cbs=None, model=None, lr=0.1, path=None):
    model = make_model() if model is None else model
    return Learner(make_dls(), model, loss_func=MSELossFlat(), opt_func=SGD, lr=lr, cbs=cbs, path=path)


def fit(learn, n_epoch, cbs=None):
    with learn.no_bar(), learn.no_logging():
        learn.fit(n_epoch, cbs=cbs)
    return learn


def sd64(model):
    "float64 copy of every floating tensor of `model`'s state_dict"
    return {k: v.detach().to(torch.float64, copy=True) for k, v in model.state_dict().items() if v.is_floating_point()}


def sd_clone(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def averaged_names(model, all_parameters=False):
    "Names the spec says are averaged: trainable (or all) params + persistent floating buffers"
    sd = model.state_dict()
    names = [n for n, p in model.named_parameters() if p.is_floating_point() and (p.requires_grad or all_parameters)]
    names += [n for n, b in model.named_buffers() if b.is_floating_point() and n in sd]
    return names


class Snap(Callback):
    "Records, for every training batch, pct_train at its start, whether the step happened, and the weights after it"
    order = 100

    def before_fit(self):
        self.snap_init = sd64(self.learn.model)
        self.snap_recs = []
        self.snap_epoch_end = []

    def before_batch(self):
        if self.learn.training:
            self.snap_pct = self.learn.pct_train
            self.snap_stepped = False
            self.snap_cancelled = False

    def after_cancel_step(self): self.snap_cancelled = True

    def after_step(self):
        if not self.snap_cancelled: self.snap_stepped = True

    def after_batch(self):
        if not self.learn.training: return
        rec = dict(pct=self.snap_pct, stepped=self.snap_stepped, w=sd64(self.learn.model))
        sch = getattr(self.learn, 'ema_schedule', None)
        if sch is not None:
            rec['last_decay'] = getattr(sch, 'last_decay', None)
            rec['decay'] = getattr(sch, 'current_decay', None)
        self.snap_recs.append(rec)

    def after_train(self): self.snap_epoch_end.append(len(self.snap_recs))


def ref_ema(snap, names, decay_fn, start_frac=0., every=1, skip=True, upto=None, init_ema=None):
    """float64 reference EMA. `decay_fn(pct)` -> per-step decay.
    Returns (ema dict, list of (record index, applied decay) for every update)."""
    ema = None if init_ema is None else {n: init_ema[n].clone() for n in names}
    cnt, prev, applied = 0, snap.snap_init, []
    recs = snap.snap_recs if upto is None else snap.snap_recs[:upto]
    for i, r in enumerate(recs):
        if ema is None and r['pct'] >= start_frac:
            ema = {n: prev[n].clone() for n in names}
        if ema is not None and (r['stepped'] or not skip):
            cnt += 1
            if cnt % every == 0:
                d = decay_fn(r['pct']) ** every
                for n in names: ema[n] = d * ema[n] + (1 - d) * r['w'][n]
                applied.append((i, d))
        prev = r['w']
    return ema, applied


def const(d): return lambda pct: d


def maxdiff(a, b, names=None):
    names = a.keys() if names is None else names
    return max((a[n].double() - b[n].double()).abs().max().item() for n in names)


def assert_ema(model_ema, ref, atol=1e-5, rtol=1e-5):
    sd = model_ema.state_dict()
    for n, v in ref.items():
        torch.testing.assert_close(sd[n].double(), v, atol=atol, rtol=rtol, msg=lambda m: f'{n}: {m}')


def valid_xy(dls):
    xs, ys = zip(*[(b[0], b[1]) for b in dls.valid])
    return torch.cat(xs), torch.cat(ys)


def loss_with_state(template, state, dls):
    "Validation loss of a copy of `template` loaded with the (float64) `state` tensors"
    m = copy.deepcopy(template)
    cur = m.state_dict()
    m.load_state_dict({k: v.to(cur[k].dtype) for k, v in state.items()}, strict=False)
    m.eval()
    x, y = valid_xy(dls)
    with torch.no_grad():
        return MSELossFlat()(m(x), y).item()


class CancelSteps(Callback):
    "Cancels the optimizer step (CancelStepException in before_step) at the given global iterations"
    order = 0

    def __init__(self, iters): self.cancel_iters = set(iters)

    def before_step(self):
        if self.learn.train_iter in self.cancel_iters: raise CancelStepException()


# ----------------------------------------------------------------------------- constant decay

@pytest.mark.parametrize('decay', [0.8, 0.0, None])
def test_constant_decay_matches_reference(decay):
    kw = {} if decay is None else dict(decay=decay)
    d = 0.9998 if decay is None else decay
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[EMACallback(**kw), snap])
    names = averaged_names(learn.model)
    assert len(snap.snap_recs) == 3 * N_ITER and all(r['stepped'] for r in snap.snap_recs)
    ref, applied = ref_ema(snap, names, const(d))
    assert len(applied) == 3 * N_ITER
    if d < 0.99:  # the test is sensitive: EMA is neither the start nor the final weights
        assert maxdiff(ref, snap.snap_init, names) > 1e-2
        if d > 0: assert maxdiff(ref, snap.snap_recs[-1]['w'], names) > 1e-2
    assert_ema(learn.model_ema, ref)
    if d == 0.0:  # decay 0 -> EMA is exactly the last weights
        assert_ema(learn.model_ema, {n: snap.snap_recs[-1]['w'][n] for n in names}, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('foreach', [None, True, False])
def test_plain_model_without_buffers_or_frozen_params(foreach):
    "nothing to copy (no integer buffers, no frozen parameters): must still work"
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(NF, 8), nn.ReLU(), nn.Linear(8, 1))
    snap = Snap()
    learn = fit(make_learner(model=model), 2, cbs=[EMACallback(decay=0.8, foreach=foreach), snap])
    names = averaged_names(learn.model)
    assert len(names) == 4
    ref, _ = ref_ema(snap, names, const(0.8))
    assert_ema(learn.model_ema, ref)


def test_model_ema_structure_and_attribute():
    cb = EMACallback(decay=0.9)
    learn = make_learner(cbs=cb)
    assert learn.ema is cb
    fit(learn, 1)
    me = learn.model_ema
    assert isinstance(me, nn.Module) and type(me) is type(learn.model)
    assert me is not learn.model
    assert not me.training and all(not m.training for m in me.modules())
    assert all(not p.requires_grad for p in me.parameters())
    assert set(me.state_dict().keys()) == set(learn.model.state_dict().keys())
    for k, v in me.state_dict().items():
        if v.is_floating_point(): assert v.dtype == torch.float32, k
    # EMA storage is not shared with the model
    for (k, a), b in zip(me.state_dict().items(), learn.model.state_dict().values()):
        assert a.data_ptr() != b.data_ptr(), k
    # the model keeps training-mode flags of its own parameters
    assert [p.requires_grad for p in learn.model.parameters()] == [p.requires_grad for p in make_model().parameters()]


def test_foreach_true_false_equal():
    out = {}
    for fe in (True, False):
        learn = fit(make_learner(), 2, cbs=EMACallback(decay=0.8, foreach=fe))
        out[fe] = sd_clone(learn.model_ema)
    for k in out[True]:
        torch.testing.assert_close(out[True][k], out[False][k], atol=1e-6, rtol=1e-6)
    # and both are right
    snap = Snap()
    learn = fit(make_learner(), 2, cbs=[EMACallback(decay=0.8, foreach=True), snap])
    ref, _ = ref_ema(snap, averaged_names(learn.model), const(0.8))
    assert_ema(learn.model_ema, ref)


# ----------------------------------------------------------------------------- skipped steps

def test_gradient_accumulation_counts_optimizer_steps():
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[GradientAccumulation(n_acc=3 * BS), EMACallback(decay=0.7), snap])
    names = averaged_names(learn.model)
    steps = [i for i, r in enumerate(snap.snap_recs) if r['stepped']]
    assert steps == [2, 5, 8, 11]  # steps cross epoch boundaries
    ref, applied = ref_ema(snap, names, const(0.7))
    assert len(applied) == len(steps) == 4
    ref_all, _ = ref_ema(snap, names, const(0.7), skip=False)
    assert maxdiff(ref, ref_all, names) > 1e-3
    assert_ema(learn.model_ema, ref)


def test_gradient_accumulation_skip_ema_false_updates_every_batch():
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[GradientAccumulation(n_acc=3 * BS), EMACallback(decay=0.7, skip_ema=False), snap])
    names = averaged_names(learn.model)
    ref, applied = ref_ema(snap, names, const(0.7), skip=False)
    assert len(applied) == 12
    assert_ema(learn.model_ema, ref)


@pytest.mark.parametrize('skip', [True, False])
def test_cancel_step_exception(skip):
    cancel = [1, 2, 5, 9]
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[CancelSteps(cancel), EMACallback(decay=0.75, skip_ema=skip), snap])
    names = averaged_names(learn.model)
    assert [i for i, r in enumerate(snap.snap_recs) if not r['stepped']] == cancel
    ref, applied = ref_ema(snap, names, const(0.75), skip=skip)
    other, _ = ref_ema(snap, names, const(0.75), skip=not skip)
    assert len(applied) == (12 - len(cancel) if skip else 12)
    assert maxdiff(ref, other, names) > 1e-3
    assert_ema(learn.model_ema, ref)


# ----------------------------------------------------------------------------- start

@pytest.mark.parametrize('start,n_epoch,start_frac,first', [
    (0.3, 4, 0.3, 5),      # fraction: first batch with pct >= .3 is batch 5 (pct .3125)
    (1, 3, 1 / 3, 4),      # epoch index
    (2, 4, 0.5, 8),
    (0.5, 4, 0.5, 8),      # exactly on an epoch boundary, as a float
])
def test_start(start, n_epoch, start_frac, first):
    snap = Snap()
    learn = fit(make_learner(), n_epoch, cbs=[EMACallback(decay=0.8, start=start), snap])
    names = averaged_names(learn.model)
    ref, applied = ref_ema(snap, names, const(0.8), start_frac=start_frac)
    assert applied[0][0] == first
    ref0, _ = ref_ema(snap, names, const(0.8))
    assert maxdiff(ref, ref0, names) > 1e-3
    assert_ema(learn.model_ema, ref)


def test_start_epoch_1_of_3_is_copy_end_epoch0_then_all_steps():
    "spec example: start=1, 3 epochs -> copy of weights at end of epoch 0, then every step of epochs 1, 2"
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[EMACallback(decay=0.8, start=1), snap])
    names = averaged_names(learn.model)
    ema = {n: snap.snap_recs[N_ITER - 1]['w'][n].clone() for n in names}
    for r in snap.snap_recs[N_ITER:]:
        for n in names: ema[n] = 0.8 * ema[n] + 0.2 * r['w'][n]
    assert_ema(learn.model_ema, ema)


# ----------------------------------------------------------------------------- half_life / update_every

@pytest.mark.parametrize('h', [4, 2.5])
def test_half_life(h):
    snap = Snap()
    learn = fit(make_learner(), 2, cbs=[EMACallback(half_life=h), snap])
    ref, _ = ref_ema(snap, averaged_names(learn.model), const(0.5 ** (1 / h)))
    assert_ema(learn.model_ema, ref)


def test_update_every_3():
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[EMACallback(decay=0.85, update_every=3), snap])
    names = averaged_names(learn.model)
    ref, applied = ref_ema(snap, names, const(0.85), every=3)
    assert [i for i, _ in applied] == [2, 5, 8, 11]
    assert all(math.isclose(d, 0.85 ** 3) for _, d in applied)
    ref1, _ = ref_ema(snap, names, const(0.85))
    assert maxdiff(ref, ref1, names) > 1e-4
    assert_ema(learn.model_ema, ref)


def test_update_every_counts_only_real_steps_and_starts_at_start():
    snap = Snap()
    cbs = [CancelSteps([5, 6]), EMACallback(decay=0.85, update_every=3, start=1), snap]
    learn = fit(make_learner(), 4, cbs=cbs)
    names = averaged_names(learn.model)
    ref, applied = ref_ema(snap, names, const(0.85), every=3, start_frac=0.25)
    # EMA starts at batch 4 (count 1); 5, 6 cancelled; counts 2,3 at batches 7,8 -> first update at 8
    assert [i for i, _ in applied] == [8, 11, 14]
    assert_ema(learn.model_ema, ref)


# ----------------------------------------------------------------------------- EMASchedule

def quad_sched(s, e): return lambda p: s + (e - s) * p * p


def sched_pos(pct, s, f): return min(max((pct - s) / (f - s), 0.), 1.)


@pytest.mark.parametrize('schedule', [SchedCos, SchedLin, SchedExp, functools.partial(SchedPoly, power=0.5), quad_sched],
                         ids=['cos', 'lin', 'exp', 'poly', 'callable'])
def test_schedule_decays_and_ema(schedule):
    sd_, fd_ = 0.5, 0.95
    cb = EMASchedule(start_decay=sd_, final_decay=fd_, start=0, finish=0.6, schedule=schedule)
    snap = Snap()
    learn = fit(make_learner(), 4, cbs=[cb, snap])
    f = schedule(sd_, fd_)
    decay_fn = lambda pct: f(sched_pos(pct, 0., 0.6))
    names = averaged_names(learn.model)
    ref, applied = ref_ema(snap, names, decay_fn)
    assert len(applied) == 16
    expected = [decay_fn(r['pct']) for r in snap.snap_recs]
    got = [r['last_decay'] for r in snap.snap_recs]
    got_d = [r['decay'] for r in snap.snap_recs]
    for e, g, gd in zip(expected, got, got_d):
        assert g is not None and math.isclose(float(g), e, rel_tol=1e-6, abs_tol=1e-9), (expected, got)
        assert gd is not None and math.isclose(float(gd), e, rel_tol=1e-6, abs_tol=1e-9), (expected, got_d)
    assert math.isclose(expected[0], sd_) and math.isclose(expected[-1], fd_)
    assert len(set(round(e, 9) for e in expected)) > 5  # the decay really varies
    ref_c, _ = ref_ema(snap, names, const(fd_))
    assert maxdiff(ref, ref_c, names) > 1e-3
    assert_ema(learn.model_ema, ref)
    # same instance, second fit -> same decays again (same n_epoch, fresh pct)
    snap2 = Snap()
    fit(learn, 4, cbs=[cb, snap2])
    for e, r in zip(expected, snap2.snap_recs):
        assert math.isclose(float(r['last_decay']), e, rel_tol=1e-6, abs_tol=1e-9)
    ref2, _ = ref_ema(snap2, names, decay_fn)
    assert_ema(learn.model_ema, ref2)


def test_schedule_epoch_ints_and_update_every():
    sd_, fd_, k = 0.6, 0.95, 2
    cb = EMASchedule(start_decay=sd_, final_decay=fd_, start=1, finish=3, schedule=SchedLin, update_every=k)
    snap = Snap()
    learn = fit(make_learner(), 4, cbs=[cb, snap])
    f = SchedLin(sd_, fd_)
    decay_fn = lambda pct: f(sched_pos(pct, 0.25, 0.75))
    names = averaged_names(learn.model)
    ref, applied = ref_ema(snap, names, decay_fn, start_frac=0.25, every=k)
    upd = dict(applied)
    assert sorted(upd) == [5, 7, 9, 11, 13, 15]
    last = None
    for i, r in enumerate(snap.snap_recs):
        if i in upd:
            assert math.isclose(float(r['last_decay']), upd[i], rel_tol=1e-6), (i, r['last_decay'], upd[i])
            assert math.isclose(float(r['decay']), decay_fn(r['pct']), rel_tol=1e-6), (i, r['decay'])
            last = upd[i]
        elif last is not None:  # between updates the last applied decay is unchanged
            assert math.isclose(float(r['last_decay']), last, rel_tol=1e-6)
    assert_ema(learn.model_ema, ref)


@pytest.mark.parametrize('s,f', [(0.5, 0.2), (3, 1)])
def test_schedule_start_after_finish_raises(s, f):
    with pytest.raises(ValueError):
        cb = EMASchedule(start=s, finish=f)
        fit(make_learner(), 4, cbs=cb)


# ----------------------------------------------------------------------------- validation

def test_validation_uses_ema_and_training_weights_untouched():
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[EMACallback(decay=0.8), snap])
    plain = fit(make_learner(), 3)
    names = averaged_names(learn.model)
    # training weights (and buffers) bit-identical to a run without EMA
    a, b = learn.model.state_dict(), plain.model.state_dict()
    for k in a: assert torch.equal(a[k], b[k]), k
    assert [v[0] for v in learn.recorder.values] == [v[0] for v in plain.recorder.values]
    for e in range(3):
        upto = snap.snap_epoch_end[e]
        ema_e, _ = ref_ema(snap, names, const(0.8), upto=upto)
        live = snap.snap_recs[upto - 1]['w']
        exp = loss_with_state(learn.model, {**live, **ema_e}, learn.dls)
        live_loss = loss_with_state(learn.model, live, learn.dls)
        assert abs(exp - live_loss) > 1e-4 * max(1., abs(exp))
        assert math.isclose(learn.recorder.values[e][1], exp, rel_tol=1e-5, abs_tol=1e-6), (e, learn.recorder.values[e], exp)
        if e == 2:
            assert math.isclose(loss_with_state(learn.model_ema, sd64(learn.model_ema), learn.dls), exp, rel_tol=1e-5)
    # the no-EMA run validates on the live weights
    assert math.isclose(plain.recorder.values[-1][1], loss_with_state(plain.model, sd64(plain.model), plain.dls), rel_tol=1e-5)


def test_validation_before_start_uses_live_weights():
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[EMACallback(decay=0.8, start=1), snap])
    names = averaged_names(learn.model)
    live0 = snap.snap_recs[N_ITER - 1]['w']
    assert math.isclose(learn.recorder.values[0][1], loss_with_state(learn.model, live0, learn.dls), rel_tol=1e-5)
    for e in (1, 2):
        upto = snap.snap_epoch_end[e]
        ema_e, _ = ref_ema(snap, names, const(0.8), start_frac=1 / 3, upto=upto)
        exp = loss_with_state(learn.model, {**snap.snap_recs[upto - 1]['w'], **ema_e}, learn.dls)
        assert math.isclose(learn.recorder.values[e][1], exp, rel_tol=1e-5, abs_tol=1e-6)


def test_validate_ema_false_uses_live_weights():
    snap = Snap()
    learn = fit(make_learner(), 2, cbs=[EMACallback(decay=0.8, validate_ema=False), snap])
    for e in range(2):
        live = snap.snap_recs[snap.snap_epoch_end[e] - 1]['w']
        assert math.isclose(learn.recorder.values[e][1], loss_with_state(learn.model, live, learn.dls), rel_tol=1e-5)
    ref, _ = ref_ema(snap, averaged_names(learn.model), const(0.8))
    assert_ema(learn.model_ema, ref)


# ----------------------------------------------------------------------------- replace_weights / device / buffers

def test_replace_weights():
    snap = Snap()
    learn = make_learner()
    rg = [p.requires_grad for p in learn.model.parameters()]
    fit(learn, 2, cbs=[EMACallback(decay=0.8, replace_weights=True), snap])
    names = averaged_names(learn.model)
    ref, _ = ref_ema(snap, names, const(0.8))
    assert maxdiff(ref, snap.snap_recs[-1]['w'], names) > 1e-2
    assert_ema(learn.model_ema, ref)
    assert_ema(learn.model, ref)
    assert learn.model is not learn.model_ema
    assert [p.requires_grad for p in learn.model.parameters()] == rg
    # and without replace_weights the model keeps its training weights
    learn2 = fit(make_learner(), 2, cbs=EMACallback(decay=0.8))
    for n in names: assert torch.equal(learn2.model.state_dict()[n].double(), snap.snap_recs[-1]['w'][n])


@pytest.mark.parametrize('dev', ['cpu', torch.device('cpu')])
def test_ema_device(dev):
    snap = Snap()
    learn = fit(make_learner(), 2, cbs=[EMACallback(decay=0.8, ema_device=dev), snap])
    assert all(t.device.type == 'cpu' for t in learn.model_ema.state_dict().values())
    ref, _ = ref_ema(snap, averaged_names(learn.model), const(0.8))
    assert_ema(learn.model_ema, ref)


def test_buffer_rules():
    learn = fit(make_learner(), 3, cbs=EMACallback(decay=0.8))
    plain = fit(make_learner(), 3)
    nbt = '1.num_batches_tracked'
    assert learn.model.state_dict()[nbt].item() == plain.model.state_dict()[nbt].item() == 3 * N_ITER
    e = learn.model_ema.state_dict()[nbt]
    assert e.dtype == torch.long and torch.equal(e, learn.model.state_dict()[nbt])
    # running stats are averaged (not copied): differ from the model's final ones
    assert not torch.allclose(learn.model_ema.state_dict()['1.running_mean'], learn.model.state_dict()['1.running_mean'])


class BumpFrozen(Callback):
    "Changes the frozen bias in place at the start of training batch 2"
    order = 50

    def before_batch(self):
        if self.learn.training and self.learn.train_iter == 2:
            with torch.no_grad(): self.learn.model[3].bias.add_(1.0)


def test_frozen_param_copied_not_averaged():
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[BumpFrozen(), EMACallback(decay=0.8), snap])
    fb = learn.model[3].bias
    assert not fb.requires_grad
    assert torch.equal(learn.model_ema[3].bias, fb.detach())
    ref, _ = ref_ema(snap, averaged_names(learn.model), const(0.8))
    assert_ema(learn.model_ema, ref)


def test_all_parameters_averages_frozen():
    snap = Snap()
    learn = fit(make_learner(), 3, cbs=[BumpFrozen(), EMACallback(decay=0.8, all_parameters=True), snap])
    names = averaged_names(learn.model, all_parameters=True)
    assert '3.bias' in names
    ref, _ = ref_ema(snap, names, const(0.8))
    assert abs(ref['3.bias'] - learn.model[3].bias.double()).max() > 1e-2
    assert_ema(learn.model_ema, ref)


# ----------------------------------------------------------------------------- resume / second fit

def test_resume_two_fits_equal_one_fit():
    a = make_learner()
    fit(a, 2, cbs=EMACallback(decay=0.8))
    e0 = sd64(a.model_ema)
    snap = Snap()
    fit(a, 3, cbs=[EMACallback(decay=0.8, resume=True), snap])
    b = fit(make_learner(), 5, cbs=EMACallback(decay=0.8))
    for k, v in a.model.state_dict().items(): assert torch.equal(v, b.model.state_dict()[k]), k
    sa, sb = a.model_ema.state_dict(), b.model_ema.state_dict()
    for k in sb: torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-6)
    names = averaged_names(a.model)
    ref, _ = ref_ema(snap, names, const(0.8), init_ema=e0)
    assert_ema(a.model_ema, ref)


def test_resume_continues_from_model_ema_values():
    "resume starts from whatever learn.model_ema holds (not from the model)"
    a = make_learner()
    fit(a, 1, cbs=EMACallback(decay=0.8))
    with torch.no_grad():
        a.model_ema[0].weight.mul_(-2.0)
    e0 = sd64(a.model_ema)
    snap = Snap()
    fit(a, 1, cbs=[EMACallback(decay=0.8, resume=True), snap])
    ref, _ = ref_ema(snap, averaged_names(a.model), const(0.8), init_ema=e0)
    assert_ema(a.model_ema, ref)


def test_resume_without_model_ema_starts_a_new_ema():
    "Nothing to continue from (the first fit of `fine_tune`): `resume=True` starts a new EMA, as without it"
    a, snap = make_learner(), Snap()
    fit(a, 2, cbs=[EMACallback(decay=0.8, resume=True), snap])
    ref, _ = ref_ema(snap, averaged_names(a.model), const(0.8))
    assert_ema(a.model_ema, ref)


def test_second_fit_without_resume_reinitialises():
    a = make_learner()
    fit(a, 2, cbs=EMACallback(decay=0.8))
    snap = Snap()
    fit(a, 1, cbs=[EMACallback(decay=0.8), snap])
    names = averaged_names(a.model)
    ref, _ = ref_ema(snap, names, const(0.8))  # starts from the model at the start of the 2nd fit
    assert_ema(a.model_ema, ref)


def test_same_instance_second_fit_behaves_like_first():
    cb = EMACallback(decay=0.8, start=1, update_every=2)
    learn = make_learner()
    names = averaged_names(learn.model)
    snap1 = Snap()
    fit(learn, 3, cbs=[cb, snap1])
    ref1, ap1 = ref_ema(snap1, names, const(0.8), start_frac=1 / 3, every=2)
    assert_ema(learn.model_ema, ref1)
    snap2 = Snap()
    fit(learn, 2, cbs=[cb, snap2])
    ref2, ap2 = ref_ema(snap2, names, const(0.8), start_frac=1 / 2, every=2)
    assert [i for i, _ in ap2] == [5, 7]
    assert_ema(learn.model_ema, ref2)
    for attr, v in (('decay', 0.8), ('start', 1), ('update_every', 2)):
        if attr in vars(cb): assert getattr(cb, attr) == v, attr


# ----------------------------------------------------------------------------- low precision

def test_bf16_model_fp32_ema_moves_like_float64_reference():
    snap = Snap()
    learn = fit(make_learner(model=make_bf16_model()), 3, cbs=[EMACallback(decay=0.9999), snap])
    names = averaged_names(learn.model)
    for n in names:
        assert learn.model.state_dict()[n].dtype == torch.bfloat16
        assert learn.model_ema.state_dict()[n].dtype == torch.float32, n
    ref, _ = ref_ema(snap, names, const(0.9999))
    moved = maxdiff(ref, snap.snap_init, names)
    assert moved > 1e-5
    err32 = maxdiff(sd64(learn.model_ema), ref, names)
    assert err32 < 1e-6, (err32, moved)
    # training weights identical to a bf16 run without EMA (validation swaps back exactly)
    plain = fit(make_learner(model=make_bf16_model()), 3)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, plain.model.state_dict()[k]), k

    # contrast: an EMA kept in bf16 cannot move by (1-0.9999)*delta
    learn16 = fit(make_learner(model=make_bf16_model()), 3, cbs=EMACallback(decay=0.9999, ema_dtype=torch.bfloat16))
    e16 = learn16.model_ema.state_dict()
    assert all(e16[n].dtype == torch.bfloat16 for n in names)
    err16 = maxdiff({n: e16[n] for n in names}, ref, names)
    assert err16 > 10 * max(err32, 1e-7)
    tot = sum(e16[n].numel() for n in names)
    same = sum((e16[n].double() == snap.snap_init[n]).sum().item() for n in names)
    assert same / tot > 0.5


# ----------------------------------------------------------------------------- inert during lr_find / get_preds / validate

def test_lr_find_get_preds_validate_inert(tmp_path):
    cb = EMACallback(decay=0.8)
    learn = make_learner(cbs=cb, path=tmp_path)
    fit(learn, 2)
    ema_obj = learn.model_ema
    ema_sd, model_sd = sd_clone(ema_obj), sd_clone(learn.model)

    def unchanged():
        assert learn.model_ema is ema_obj
        for k, v in ema_obj.state_dict().items(): assert torch.equal(v, ema_sd[k]), k
        for k, v in learn.model.state_dict().items(): assert torch.equal(v, model_sd[k]), k

    live_loss = loss_with_state(learn.model, sd64(learn.model), learn.dls)
    with learn.no_bar(), learn.no_logging():
        res = learn.validate()
    assert math.isclose(float(res[0]), live_loss, rel_tol=1e-5)
    unchanged()
    with learn.no_bar(), learn.no_logging():
        preds, targs = learn.get_preds(dl=learn.dls.valid)
    x, _ = valid_xy(learn.dls)
    m = copy.deepcopy(learn.model).eval()
    with torch.no_grad(): torch.testing.assert_close(preds, m(x).float(), atol=1e-6, rtol=1e-6)
    unchanged()
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=12, show_plot=False)
    unchanged()
    # the callback (still in learn.cbs) works normally in the next fit
    snap = Snap()
    fit(learn, 2, cbs=snap)
    assert learn.model_ema is not ema_obj
    ref, _ = ref_ema(snap, averaged_names(learn.model), const(0.8))
    assert_ema(learn.model_ema, ref)


class Boom(Exception): pass


class Crash(Callback):
    "Raises a non-fastai exception at a given global training iteration (or in validation)"
    order = 50

    def __init__(self, at_iter=None, in_valid=False): self.crash_iter, self.crash_valid = at_iter, in_valid

    def after_batch(self):
        if self.learn.training and self.learn.train_iter == self.crash_iter: raise Boom('boom')
        if not self.learn.training and self.crash_valid: raise Boom('boom')


def test_crashed_fit_leaves_no_ema_behind():
    "an exception mid-fit (e.g. a KeyboardInterrupt in a notebook) must not leave EMA validation active"
    learn = make_learner()
    with pytest.raises(Boom):
        fit(learn, 3, cbs=[EMACallback(decay=0.8), Crash(at_iter=6)])
    live = sd_clone(learn.model)
    live_loss = loss_with_state(learn.model, sd64(learn.model), learn.dls)
    with learn.no_bar(), learn.no_logging():
        res = learn.validate()
    assert math.isclose(float(res[0]), live_loss, rel_tol=1e-5), (float(res[0]), live_loss)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, live[k]), k
    # a later fit without any EMA validates on its live weights
    snap = Snap()
    fit(learn, 1, cbs=snap)
    last = snap.snap_recs[-1]['w']
    assert math.isclose(learn.recorder.values[-1][1], loss_with_state(learn.model, last, learn.dls), rel_tol=1e-5)


def test_crash_during_validation_restores_training_weights():
    snap = Snap()
    learn = make_learner()
    with pytest.raises(Boom):
        fit(learn, 2, cbs=[EMACallback(decay=0.8), Crash(in_valid=True), snap])
    w = snap.snap_recs[N_ITER - 1]['w']
    sd = learn.model.state_dict()
    for k, v in w.items(): assert torch.equal(sd[k].double(), v), k


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('kwargs,name', [
    (dict(decay=1.0), 'decay'),
    (dict(decay=-0.1), 'decay'),
    (dict(decay=1.5), 'decay'),
    (dict(half_life=0), 'half_life'),
    (dict(half_life=-3), 'half_life'),
    (dict(update_every=0), 'update_every'),
    (dict(ema_device='not_a_device'), 'ema_device'),
    (dict(start=-1), 'start'),
    (dict(start=-0.1), 'start'),
])
def test_bad_input(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        EMACallback(**kwargs)


def test_decay_and_half_life_together_is_value_error():
    with pytest.raises(ValueError, match='half_life|decay'):
        EMACallback(decay=0.99, half_life=10)


def test_good_input_constructs():
    EMACallback(decay=0.0); EMACallback(half_life=1); EMACallback(update_every=1); EMACallback(ema_device='cpu')
    EMACallback(start=0.5); EMACallback(start=2)
    EMASchedule(start=0.1, finish=0.5); EMASchedule(start=1, finish=3)
