"""`fastxtend_ema` next to the package it replaces, `fastxtend==0.1.7` (installed by the `dev` extra).

Two kinds of tests:

* **agreement**: where fastxtend's EMA is right, both packages give the same EMA (within 1e-6) on the same
  training run: constant decay with `foreach` True and False, a delayed `start` (fraction or epoch),
  `replace_weights`, and the float64 reference agrees with both;
* **differences on purpose**: fastxtend's defects, each reproduced here with its numbers, next to what this
  package does instead (checked against the float64 reference or a run without EMA, never against fastxtend).

Importing fastxtend changes fastai globally (it appends `LogDispatch` to `defaults.callbacks` and patches
`Learner`), so every fastxtend run happens in ONE subprocess that prints its results as JSON; this process never
imports it (`test_fastxtend_never_imported_here`). The subprocess is started first and runs while this process
trains the same scenarios with `fastxtend_ema`. Both processes build the test bed from the same source code
(the functions below are shipped to the subprocess with `inspect.getsource`), train on one thread, without
shuffling, so the training runs are step for step the same (checked by `test_same_training_run_in_both_packages`).
"""
import inspect, json, subprocess, sys, textwrap, warnings

import pytest
import torch
from torch import nn

from fastai.basics import Learner, Callback, DataLoaders, MSELossFlat, SGD
from fastai.data.load import DataLoader
from fastai.callback.schedule import SchedLin

from fastxtend_ema import EMACallback, EMASchedule
from fastxtend_ema.test_utils import synth_dls, synth_model, fit_quiet, valid_loss

FASTXTEND_VERSION = '0.1.7'
N_ITER = 4                      # 64 training samples, bs=16
PARAMS = ['0.weight', '0.bias', '1.weight', '1.bias', '3.weight']   # '3.bias' is frozen (not averaged)
BN_FLOAT = ['1.running_mean', '1.running_var']
AVG = PARAMS + BN_FLOAT
NBT = '1.num_batches_tracked'
EPS = 1e-6


# ----------------------------------------------------------------------------- test bed, shared with the subprocess
# (the test bed of fastxtend_ema.test_utils, with 64 training samples: 3 epochs are 12 steps)

def synth_learner(cbs=None, lr=0.05, seed=0):
    "The test bed of `fastxtend_ema.test_utils`, 64 training rows: 4 batches an epoch"
    return Learner(synth_dls(n_train=64, seed=seed), synth_model(seed), loss_func=MSELossFlat(), opt_func=SGD, lr=lr, cbs=cbs)

def state(model):
    "float64 copy of a state_dict, as JSON-able lists"
    return {k: v.detach().double().tolist() for k, v in model.state_dict().items()}

class Snapshots(Callback):
    "After every optimizer step: a float64 copy of the model's state; after every training batch: its BN counter"
    order = 100
    def before_fit(self): self.initial, self.steps, self.nbt = state(self.learn.model), [], []
    def after_step(self): self.steps.append(state(self.learn.model))
    def after_batch(self):
        if self.training: self.nbt.append(int(self.learn.model[1].num_batches_tracked))

class DecayLog(Callback):
    "The decay the EMA schedule used at every training batch (`None`: no EMA update yet)"
    order = 101
    def before_fit(self): self.decays = []
    def after_batch(self):
        if not self.training: return
        cb = self.learn.ema_schedule
        if hasattr(cb, 'last_decay'): self.decays.append(cb.last_decay)              # fastxtend_ema
        else: self.decays.append(float(cb.decay) if cb._do_ema else None)            # fastxtend 0.1.7

def run_constant(foreach, n_epoch=3, **kwargs):
    snaps = Snapshots()
    learn = fit_quiet(synth_learner(cbs=[EMACallback(decay=0.9, foreach=foreach, **kwargs), snaps]), n_epoch)
    ema = getattr(learn, 'model_ema', None)   # fastxtend sets none with replace_weights=True
    return learn, dict(ema=None if ema is None else state(ema), model=state(learn.model), nbt=snaps.nbt,
                       initial=snaps.initial, steps=snaps.steps)

def run_all():
    "Every scenario, run the same way by both packages (`EMACallback`, `EMASchedule` are the package's)"
    res = {}
    for fe in (True, False):
        learn, r = run_constant(fe)
        res[f'const_{fe}'] = r
        r['valid_recorded'] = float(learn.recorder.values[-1][1])
        r['valid_raw'], r['valid_ema'] = valid_loss(learn.model, learn.dls), valid_loss(learn.model_ema, learn.dls)
        before = learn.model_ema   # then learn.validate() after fit
        with learn.no_bar(), learn.no_logging(): r['validate'] = float(learn.validate()[0])
        r['validate_same_object'] = learn.model_ema is before
        r['ema_after_validate'] = state(learn.model_ema)
        for name, start in (('frac', 0.25), ('epoch', 1)):
            _, res[f'start_{name}_{fe}'] = run_constant(fe, n_epoch=4, start=start)
    _, res['replace'] = run_constant(False, replace_weights=True)
    for name, start, finish in (('epoch', 1, 2), ('frac', 0.25, 0.5)):
        cb, log, snaps = EMASchedule(0.5, 0.9, start=start, finish=finish, schedule=SchedLin), DecayLog(), Snapshots()
        learn = fit_quiet(synth_learner(cbs=[cb, log, snaps]), 4)
        r = res[f'sched_{name}'] = dict(decays=log.decays, ema=state(learn.model_ema), initial=snaps.initial, steps=snaps.steps)
        if name == 'epoch':   # a second fit with the same instance
            try:
                fit_quiet(learn, 4)
                r['refit'] = dict(error=None, decays=log.decays, ema=state(learn.model_ema), steps=snaps.steps)
            except Exception as e: r['refit'] = dict(error=f'{type(e).__name__}: {e}')
    return res

SHARED = [synth_learner, state, Snapshots, DecayLog, run_constant, run_all]

FX_SCRIPT = '''
import json, sys, warnings
warnings.filterwarnings('ignore')
try:
    import fastxtend
    from fastxtend.callback.ema import EMACallback, EMASchedule
except Exception as e:
    print('@@JSON@@' + json.dumps(dict(import_error=f'{type(e).__name__}: {e}'))); sys.exit(0)
import torch
from torch import nn
from fastai.basics import Learner, Callback, DataLoaders, MSELossFlat, SGD
from fastai.data.load import DataLoader
from fastai.callback.schedule import SchedLin
from fastxtend_ema.test_utils import synth_dls, synth_model, fit_quiet, valid_loss
torch.set_num_threads(1)
{shared}
res = run_all()
res['version'] = fastxtend.__version__
print('@@JSON@@' + json.dumps(res))
'''


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def fx_proc(tmp_path_factory):
    "Start the fastxtend subprocess (it runs while this process trains with fastxtend_ema)"
    script = tmp_path_factory.mktemp('fastxtend')/'run_fastxtend.py'
    script.write_text(FX_SCRIPT.replace('{shared}', '\n'.join(textwrap.dedent(inspect.getsource(o)) for o in SHARED)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None: proc.kill(); proc.wait()

@pytest.fixture(scope='module')
def ours(fx_proc):
    "The scenarios run with fastxtend_ema in this process"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            res = json.loads(json.dumps(run_all()))   # same JSON round trip as fastxtend's results
            plain = fit_quiet(synth_learner(), 3)     # the same training without any EMA
            res['plain'] = state(plain.model)
    finally: torch.set_num_threads(threads)
    return res

@pytest.fixture(scope='module')
def fx(fx_proc, ours):
    "The same scenarios run with fastxtend 0.1.7, in the subprocess"
    try: out, err = fx_proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        fx_proc.kill(); pytest.fail('the fastxtend subprocess took more than 300 s')
    lines = [l for l in out.splitlines() if l.startswith('@@JSON@@')]
    if fx_proc.returncode != 0 or not lines:
        pytest.fail(f'the fastxtend subprocess failed (rc={fx_proc.returncode}):\n{err[-4000:]}')
    res = json.loads(lines[-1][len('@@JSON@@'):])
    if 'import_error' in res:
        pytest.fail(f'fastxtend=={FASTXTEND_VERSION} is not importable ({res["import_error"]}); it is a test requirement: '
                    f'pip install -c .ci/constraints.txt -e ".[test]"')
    assert res['version'] == FASTXTEND_VERSION, f'these tests describe fastxtend {FASTXTEND_VERSION}, found {res["version"]}'
    return res


# ----------------------------------------------------------------------------- helpers

def T(x): return torch.tensor(x, dtype=torch.float64)

def reference(initial, steps, decays):
    "float64 EMA: starts at `initial`, `decays[i]` applied after step `i` (`None`: no update)"
    ema = {n: T(initial[n]) for n in AVG}
    for s, d in zip(steps, decays, strict=True):
        if d is None: continue
        for n in ema: ema[n] = d*ema[n] + (1-d)*T(s[n])
    return ema

def maxdiff(a, b, names):
    return max((T(a[n]) - (b[n] if isinstance(b[n], torch.Tensor) else T(b[n]))).abs().max().item() for n in names)

def const_ref(r, start_step=0):
    "Reference for a constant decay 0.9 started at step index `start_step` (EMA copied from the weights there)"
    init = r['initial'] if start_step == 0 else r['steps'][start_step-1]
    return reference(init, r['steps'][start_step:], [0.9]*(len(r['steps'])-start_step))

def sched_expected(n, start, finish, a=0.5, b=0.9):
    "The decay at each batch as EMASchedule's formula says: SchedLin(a, b) at the progress from start to finish"
    f = SchedLin(a, b)
    return [None if i/n < start else float(f(min(max((i/n-start)/(finish-start), 0.), 1.))) for i in range(n)]


# ----------------------------------------------------------------------------- agreement

def test_same_training_run_in_both_packages(ours, fx):
    "Sanity: both processes train the same model step for step, so their EMAs can be compared"
    for key in ('const_False', 'start_frac_False', 'replace'):
        assert len(ours[key]['steps']) == len(fx[key]['steps']) > 0
        for a, b in zip(ours[key]['steps'], fx[key]['steps']): assert maxdiff(a, b, PARAMS) == 0, key
    assert maxdiff(ours['const_False']['model'], ours['plain'], PARAMS + BN_FLOAT) == 0

@pytest.mark.parametrize('foreach', [True, False])
def test_constant_decay_parameters_agree(ours, fx, foreach):
    "Agreement: EMACallback(decay=0.9), foreach True and False: both packages' EMA parameters equal the float64 reference"
    o, f = ours[f'const_{foreach}'], fx[f'const_{foreach}']
    ref = const_ref(o)
    assert maxdiff(o['ema'], f['ema'], PARAMS) < EPS
    assert maxdiff(o['ema'], ref, PARAMS) < EPS and maxdiff(f['ema'], ref, PARAMS) < EPS
    assert maxdiff(o['ema'], o['initial'], PARAMS) > 0.01   # the EMA did move away from the initial weights
    assert o['ema']['3.bias'] == f['ema']['3.bias'] == o['initial']['3.bias']   # frozen: kept as it is

def test_bn_running_stats_agree_with_fastxtend_foreach(ours, fx):
    "Agreement: with foreach=True fastxtend averages BatchNorm running stats correctly, and both packages agree"
    o, f = ours['const_True'], fx['const_True']
    assert maxdiff(o['ema'], f['ema'], BN_FLOAT) < EPS
    assert maxdiff(f['ema'], const_ref(o), BN_FLOAT) < EPS

@pytest.mark.parametrize('foreach', [True, False])
@pytest.mark.parametrize('start', ['frac', 'epoch'])
def test_delayed_start_agrees(ours, fx, start, foreach):
    "Agreement: start=0.25 and start=1 (epoch, of 4) both copy the weights after step 4 of 16 and average from there"
    o, f = ours[f'start_{start}_{foreach}'], fx[f'start_{start}_{foreach}']
    assert len(o['steps']) == 16
    ref = const_ref(o, start_step=N_ITER)
    assert maxdiff(o['ema'], f['ema'], PARAMS) < EPS
    assert maxdiff(o['ema'], ref, AVG) < EPS and maxdiff(f['ema'], ref, PARAMS) < EPS
    assert maxdiff(f['ema'], const_ref(o), PARAMS) > 1e-3   # starting at step 0 would give another EMA
    if foreach: assert maxdiff(o['ema'], f['ema'], BN_FLOAT) < EPS

def test_replace_weights_agrees(ours, fx):
    "Agreement: replace_weights=True leaves the EMA parameters in learn.model in both packages"
    o, f = ours['replace'], fx['replace']
    ref = const_ref(o)
    assert maxdiff(o['model'], f['model'], PARAMS) < EPS
    assert maxdiff(o['model'], ref, AVG) < EPS and maxdiff(f['model'], ref, PARAMS) < EPS
    assert maxdiff(o['model'], o['ema'], list(o['ema'])) == 0   # ours: learn.model_ema holds the same weights
    assert f['ema'] is None                                     # fastxtend: learn.model_ema is not set

def test_validation_during_fit_uses_the_ema_in_both(ours, fx):
    "Agreement: the validation loss recorded during fit is the EMA model's loss in both packages (equal with foreach=True)"
    for r in (ours['const_True'], ours['const_False'], fx['const_True'], fx['const_False']):
        assert r['valid_recorded'] == pytest.approx(r['valid_ema'], abs=1e-5)
        assert abs(r['valid_ema'] - r['valid_raw']) > 1e-3
    assert ours['const_True']['valid_recorded'] == pytest.approx(fx['const_True']['valid_recorded'], abs=1e-5)
    assert ours['const_False']['valid_recorded'] == pytest.approx(ours['const_True']['valid_recorded'], abs=1e-6)


# ----------------------------------------------------------------------------- differences on purpose

def test_foreach_false_bn_running_stats(ours, fx):
    "Difference (b): fastxtend foreach=False never averages BatchNorm running stats (left at init); ours matches float64"
    o, f = ours['const_False'], fx['const_False']
    ref = const_ref(o)
    assert maxdiff(o['ema'], ref, BN_FLOAT) < EPS
    assert f['ema']['1.running_mean'] == [0.]*16 and f['ema']['1.running_var'] == [1.]*16   # their initial values
    assert maxdiff(f['ema'], ref, BN_FLOAT) > 0.05
    assert maxdiff(o['ema'], ours['const_True']['ema'], AVG) < EPS   # ours: the loop path gives the fused path's EMA
    # so fastxtend's EMA model, and the validation loss it records during fit, depend on foreach; ours do not
    assert abs(f['valid_recorded'] - fx['const_True']['valid_recorded']) > 0.1
    assert o['valid_recorded'] == pytest.approx(fx['const_True']['valid_recorded'], abs=1e-5)

@pytest.mark.parametrize('foreach', [True, False])
def test_num_batches_tracked(ours, fx, foreach):
    "Difference (a): fastxtend foreach=True corrupts the model's num_batches_tracked (2, not 12); ours leaves the model alone"
    o, f = ours[f'const_{foreach}'], fx[f'const_{foreach}']
    # ours: the model is exactly that of a run without EMA, and its counter is copied into the EMA
    assert o['model'] == ours['plain']
    assert o['nbt'] == list(range(1, 13)) and o['model'][NBT] == 12 and o['ema'][NBT] == 12
    # fastxtend: its EMA's counter is never updated; with foreach=True `eb is mb` and d*n+(1-d)*n truncates to int
    assert f['ema'][NBT] == 0
    if foreach: assert f['nbt'] == [1] + [2]*11 and f['model'][NBT] == 2
    else: assert f['nbt'] == list(range(1, 13)) and f['model'][NBT] == 12

@pytest.mark.parametrize('foreach', [True, False])
def test_validate_after_fit(ours, fx, foreach):
    "Difference (c): learn.validate() after fit overwrites fastxtend's learn.model_ema with a copy of the model; not ours"
    o, f = ours[f'const_{foreach}'], fx[f'const_{foreach}']
    # both validate the live model in learn.validate() (EMA validation is only during fit)
    assert o['validate'] == pytest.approx(o['valid_raw'], abs=1e-5)
    assert f['validate'] == pytest.approx(f['valid_raw'], abs=1e-5)
    # ours: the same object with the same EMA weights
    assert o['validate_same_object'] and o['ema_after_validate'] == o['ema']
    # fastxtend: a new object holding the raw model's weights (its own counter included); the EMA is lost
    assert not f['validate_same_object']
    assert f['ema_after_validate'] == f['model']
    assert maxdiff(f['ema_after_validate'], f['ema'], PARAMS) > 0.01

def test_schedule_with_epoch_start_runs_backwards_in_fastxtend(ours, fx):
    "Difference (d): EMASchedule(0.5, 0.9, start=1, finish=2, SchedLin) over 4 epochs: fastxtend's decay goes down, ours up"
    o, f = ours['sched_epoch'], fx['sched_epoch']
    exp = sched_expected(16, 0.25, 0.5)
    assert exp[:8] == [None]*4 + [0.5, 0.6, 0.7, 0.8] and exp[8:] == [0.9]*8
    assert o['decays'] == pytest.approx(exp, abs=1e-12)
    assert maxdiff(o['ema'], reference(o['steps'][N_ITER-1], o['steps'][N_ITER:], exp[N_ITER:]), AVG) < EPS
    # fastxtend: step -0.125 instead of +0.25 (the raw int start in its schedule increment)
    assert f['decays'][:7] == pytest.approx([None]*4 + [0.5, 0.45, 0.4], abs=1e-6) and f['decays'][7:] == [0.9]*9
    assert maxdiff(o['ema'], f['ema'], PARAMS) > 1e-4

def test_schedule_with_fraction_start(ours, fx):
    "Difference (minor): float start/finish, SchedLin: same decays except fastxtend reaches final_decay one step early"
    o, f = ours['sched_frac'], fx['sched_frac']
    exp = sched_expected(16, 0.25, 0.5)
    assert o['decays'] == pytest.approx(exp, abs=1e-12)
    assert maxdiff(o['ema'], reference(o['steps'][N_ITER-1], o['steps'][N_ITER:], exp[N_ITER:]), AVG) < EPS
    early = [i for i, (a, b) in enumerate(zip(o['decays'], f['decays'])) if a != pytest.approx(b, abs=1e-6)]
    assert early == [7] and f['decays'][7] == 0.9 and o['decays'][7] == pytest.approx(0.8)
    # the step before the last one differs, so the EMAs differ, but fastxtend's follows the reference with its own decays
    assert maxdiff(f['ema'], reference(o['steps'][N_ITER-1], o['steps'][N_ITER:], f['decays'][N_ITER:]), PARAMS) < EPS

def test_schedule_second_fit(ours, fx):
    "Difference (e): a second fit with the same EMASchedule raises TypeError in fastxtend; ours repeats the first fit's decays"
    f, o = fx['sched_epoch']['refit'], ours['sched_epoch']
    assert f['error'].startswith('TypeError') and '_Annealer.__call__()' in f['error']
    assert o['refit']['error'] is None
    assert o['refit']['decays'] == o['decays']
    r = o['refit']
    assert maxdiff(r['ema'], reference(r['steps'][N_ITER-1], r['steps'][N_ITER:], o['decays'][N_ITER:]), AVG) < EPS


def test_fastxtend_never_imported_here(ours, fx):
    "The comparison itself: fastxtend ran only in the subprocess, this process's fastai is untouched"
    from fastai.callback.core import defaults
    # nbdev's show_doc (run by the notebook tests) loads every installed nbdev package's `_modidx`, fastxtend's too:
    # harmless. Its callbacks are what carry import-time side effects.
    assert not [m for m in sys.modules if m.startswith('fastxtend.callback')]
    assert not any(getattr(c, '__name__', '') == 'LogDispatch' for c in defaults.callbacks)
