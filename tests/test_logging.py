"""LogDispatch against the real loggers: fastai's TensorBoardCallback (event files read back with TensorBoard's reader)
and WandbCallback (an offline run in a child process, its history read back from the .wandb file with `wandb leet
inspect`). The EMA integration is simulated by `EMALogged`, an `EMASchedule` subclass that logs its decay the way the
EMA callbacks are meant to: `log_dispatch(learn)` in `before_fit`, `ld.log(ema_decay=...)` in `after_batch`."""
import glob, json, os, subprocess, sys
from collections import Counter
from functools import wraps
from pathlib import Path
import pytest
import torch
from torch import nn
from fastcore.test import test_eq as check_eq, test_close as check_close, test_is as check_is   # renamed: pytest would collect test_*
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from fastai.optimizer import SGD
from fastxtend_ema.callback import EMACallback, EMASchedule
from fastxtend_ema.test_utils import synth_learner as _synth_learner, fit_quiet
from fastxtend_ema.loggers import LogDispatch, log_dispatch, patch_fastai_wandb, _wandb_config_broken

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------- test bed
def synth_learner(cbs=None, lr=0.05, seed=0):
    "`test_utils.synth_learner` with a model without BatchNorm: 6 training and 2 validation batches per epoch"
    torch.manual_seed(seed)
    return _synth_learner(cbs=cbs, lr=lr, seed=seed, model=nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)))

class Emitter(Callback):
    "Hands `x` (and `probe/neg_x`) to `LogDispatch` at every training batch, `x_valid` after every validation"
    run_valid = False
    def __init__(self): self.sent,self.sent_valid = [],[]
    def before_fit(self): self.ld = log_dispatch(self.learn)
    def after_loss(self):
        if self.ld is None: return
        x = len(self.sent)/4 + 1   # quarters: exact in TensorBoard's float32; never repeats across fits
        self.ld.log({'probe/neg_x': -x}, x=x)
        self.sent.append(x)
    def after_validate(self):
        if self.ld is None: return
        v = len(self.sent_valid) + 0.5
        self.ld.log_valid(x_valid=v)
        self.sent_valid.append(v)

class EMALogged(EMASchedule):
    "`EMASchedule` recording, from its public state, the decay it must have logged at each training batch"
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []
    def after_batch(self):
        started, updates = self.started, self.updates
        super().after_batch()   # logs `ema_decay` through log_dispatch when a logger is on the Learner
        if self._fit.ld is not None:
            self.sent.append(0. if not started else self.last_decay if self.updates > updates else 1.)

class Probe(Callback):
    "After the loggers and LogDispatch: the step each logger used for every training batch and epoch, and a value it wrote there"
    order,run_valid = LogDispatch.order+1,False
    def __init__(self, logger):
        self.logger = logger
        self.steps,self.own,self.epoch_steps,self.valid_losses = [],[],[],[]
    def _step(self): return self.learn.wandb._wandb_step if self.logger=='wandb' else self.learn.train_iter
    def after_batch(self):
        self.steps.append(self._step())
        # the value the logger itself wrote for this batch: W&B `raw_loss`, TensorBoard `train_loss`
        self.own.append((self.learn.loss if self.logger=='wandb' else self.learn.smooth_loss).item())
    def after_epoch(self):
        self.epoch_steps.append(self._step())
        self.valid_losses.append(float(self.learn.recorder.log[2]))

# ---------------------------------------------------------------------------------------------------- order, import
def test_order_after_both_loggers():
    from fastai.callback.tensorboard import TensorBoardCallback
    from fastai.callback.wandb import WandbCallback
    assert LogDispatch.order > WandbCallback.order and LogDispatch.order > TensorBoardCallback.order
    assert EMASchedule.order < WandbCallback.order   # its before_fit (log_dispatch, the W&B remedy) runs first
    assert LogDispatch.run_valid is False

def test_import_has_no_side_effects():
    # the package's __init__ (whose fastai imports patch Learner, fastai's own doing) is checked in test_project.py
    code = ("import sys, fastxtend_ema, fastai.callback.core as c; from fastai.learner import Learner; "
            "before = (list(c.defaults.callbacks), dict(vars(Learner))); "
            "import fastxtend_ema.loggers; "
            "print(before == (list(c.defaults.callbacks), dict(vars(Learner))), 'wandb' in sys.modules, "
            "'tensorboard' in sys.modules, 'fastai.callback.wandb' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert out == ['True', 'False', 'False', 'False'], out

# ---------------------------------------------------------------------------------------------------- TensorBoard
def tb_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(log_dir), purge_orphaned_data=False); ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)] if tag in ea.Tags()['scalars'] else []

def tb_learner(cbs, log_dir):
    from fastai.callback.tensorboard import TensorBoardCallback
    return synth_learner(cbs=list(cbs) + [TensorBoardCallback(log_dir, trace_model=False, log_preds=False)])

def test_tensorboard_values_on_the_loggers_steps(tmp_path):
    emitter, ema, probe = Emitter(), EMALogged(0.5, 0.99, finish=0.5), Probe('tensorboard')
    learn = fit_quiet(tb_learner([emitter, ema, probe], tmp_path), 2)
    check_is(learn.log_dispatch, emitter.ld)
    check_is(ema._fit.ld, emitter.ld)
    n = 12
    check_eq(len(probe.steps), n)
    check_eq(probe.steps, list(range(1, n+1)))   # learn.train_iter after each batch
    # the logger's own value for each batch is at the step the probe saw: the probe reads the logger's step axis
    own = dict(tb_scalars(tmp_path, 'train_loss'))
    for s,v in zip(probe.steps, probe.own, strict=True): check_close(own[s], v, eps=1e-5)
    # every value handed over, at its batch's step
    check_eq((len(emitter.sent), len(ema.sent)), (n, n))
    check_eq(tb_scalars(tmp_path, 'x'), list(zip(probe.steps, emitter.sent)))
    check_eq(tb_scalars(tmp_path, 'probe/neg_x'), [(s, -x) for s,x in zip(probe.steps, emitter.sent)])
    decays = tb_scalars(tmp_path, 'ema_decay')
    check_eq([s for s,_ in decays], probe.steps)
    check_close([d for _,d in decays], ema.sent, eps=1e-6)   # float32 in the event file
    assert len(set(ema.sent)) > 5 and ema.sent[0] < ema.sent[-1]   # the warmup: a value that changes per batch
    # once per epoch, at the step of the logger's validation metrics
    check_eq(probe.epoch_steps, [6, 12])
    check_eq([s for s,_ in tb_scalars(tmp_path, 'valid_loss')], probe.epoch_steps)
    check_eq(tb_scalars(tmp_path, 'x_valid'), list(zip(probe.epoch_steps, emitter.sent_valid)))

def test_ema_decay_logged_before_start_on_skipped_steps_and_between_updates(tmp_path):
    "ema_decay is 0 before the EMA starts, 1 on a batch without an update (skipped step, between updates), else the decay applied"
    from fastai.callback.core import CancelStepException
    class CancelAt(Callback):
        order = 0
        def before_step(self):
            if self.learn.train_iter == 8: raise CancelStepException()
    d = 0.8
    learn = fit_quiet(tb_learner([CancelAt(), EMACallback(decay=d, start=1, update_every=2)], tmp_path), 2)   # 2 epochs of 6 batches
    logged = tb_scalars(tmp_path, 'ema_decay')
    check_eq([st for st,_ in logged], list(range(1, 13)))
    # batches 0-5: before the start; 6-11: steps 1,2,(8 skipped),3,4,5 with an update every 2nd step
    expected = [0.]*6 + [1., d**2, 1., 1., d**2, 1.]
    check_close([v for _,v in logged], expected, eps=1e-6)
    check_eq(learn.ema.updates, 2)

def test_tensorboard_gets_raw_and_ema_validation_columns(tmp_path):
    "validate_ema='both': the Recorder's ema_* columns reach TensorBoard at each epoch, with the Recorder's values"
    from fastai.metrics import mae
    learn = tb_learner([EMASchedule(0.5, 0.9, finish=0.5, validate_ema='both')], tmp_path)
    learn.metrics = [mae]
    fit_quiet(learn, 2)
    names = list(learn.recorder.metric_names)
    for name in ('valid_loss', 'ema_valid_loss', 'mae', 'ema_mae'):
        logged = tb_scalars(tmp_path, name)
        check_eq([st for st,_ in logged], [6, 12])
        check_close([v for _,v in logged], [row[names.index(name)-1] for row in learn.recorder.values], eps=1e-5)
    assert tb_scalars(tmp_path, 'ema_valid_loss') != tb_scalars(tmp_path, 'valid_loss')

def test_rank_other_than_zero_writes_nothing(tmp_path, monkeypatch):
    import fastai.callback.tensorboard as fastai_tb
    monkeypatch.setenv('RANK', '1')
    learn = tb_learner([Emitter()], tmp_path)
    check_is(log_dispatch(learn), None)
    check_eq([cb for cb in learn.cbs if isinstance(cb, LogDispatch)], [])
    # a LogDispatch given explicitly is returned, and checks the rank itself: with the logger made to write on
    # rank 1, the logger's values are there and none of LogDispatch's
    monkeypatch.setattr(fastai_tb, 'rank_distrib', lambda: 0)
    emitter = Emitter()
    learn = fit_quiet(tb_learner([LogDispatch(), emitter], tmp_path), 1)
    check_is(emitter.ld, learn.log_dispatch)
    check_eq(len(emitter.sent), 6)
    check_eq(len(tb_scalars(tmp_path, 'train_loss')) >= 6, True)
    check_eq(tb_scalars(tmp_path, 'x') + tb_scalars(tmp_path, 'x_valid'), [])

# ---------------------------------------------------------------------------------------------------- no logger
def _counted(f, name, calls):
    @wraps(f)
    def counted(*args, **kwargs):
        calls[name] += 1
        return f(*args, **kwargs)
    return counted

def test_without_a_logger_nothing_runs_per_batch(tmp_path, monkeypatch):
    calls = Counter()
    for name in ('__init__', 'log', 'log_valid', 'before_fit', 'after_batch', 'after_epoch', 'after_fit'):
        monkeypatch.setattr(LogDispatch, name, _counted(getattr(LogDispatch, name), name, calls))
    emitter, ema = Emitter(), EMALogged(0.5, 0.99)
    learn = fit_quiet(synth_learner(cbs=[emitter, ema]), 2)
    check_is(log_dispatch(learn), None)
    check_is(emitter.ld, None); check_is(ema._fit.ld, None)
    check_eq([cb for cb in learn.cbs if isinstance(cb, LogDispatch)], [])
    check_eq(sum(calls.values()), 0)
    check_eq(ema.updates, 12)   # the EMA itself ran
    # the same counters, with a logger: one LogDispatch, every training batch (so the zero above can fail)
    fit_quiet(tb_learner([Emitter(), EMALogged(0.5, 0.99)], tmp_path), 2)
    check_eq(calls['__init__'], 1)
    check_eq(calls['after_batch'], 12)
    check_eq(calls['log'], 24)
    check_eq(calls['log_valid'], 2)

# ---------------------------------------------------------------------------------------------------- W&B remedy
def test_patch_fastai_wandb_is_narrow_and_switches_itself_off(monkeypatch):
    import fastai.callback.wandb as fw
    from fastai.callback.wandb import WandbCallback
    orig = fw.init_args
    monkeypatch.setattr(fw, 'init_args', orig)   # put back after the test, whatever happens below
    before = dict(vars(fw))
    broken = _wandb_config_broken(fw)
    check_eq(patch_fastai_wandb(), broken)
    assert not _wandb_config_broken(fw)
    check_eq(patch_fastai_wandb(), False)   # once is enough
    changed = [k for k in vars(fw) if vars(fw)[k] is not before.get(k)]
    check_eq(changed, ['init_args'] if broken else [])
    # the config fastai builds from plain values now formats, values kept as they are
    cfg = fw._format_config({'lr': 0.1, 'EMACallback': {'decay': 0.9998, 'ema_device': torch.device('cpu')}, 'moms': (0.95, 0.85)})
    check_eq(cfg, {'lr': 0.1, 'EMACallback': {'decay': 0.9998, 'ema_device': torch.device('cpu')}, 'moms': (0.95, 0.85)})
    cb = WandbCallback(log_preds=False)
    check_eq(fw.init_args(cb), orig(cb))   # objects with a __dict__: fastcore's answer
    # a fastai (or fastcore) that works: the patch does nothing
    fixed = lambda o: orig(o) if hasattr(o, '__dict__') else {}
    monkeypatch.setattr(fw, 'init_args', fixed)
    check_eq(patch_fastai_wandb(), False)
    check_is(fw.init_args, fixed)
    # fastai's W&B module not loaded: nothing to patch, nothing imported
    monkeypatch.delitem(sys.modules, 'fastai.callback.wandb')
    check_eq(patch_fastai_wandb(), False)
    assert 'fastai.callback.wandb' not in sys.modules

# ---------------------------------------------------------------------------------------------------- W&B, offline
def _wandb_child(out):
    "Run in a child process (W&B keeps global state): fastai alone, then 2 fits + 1 fit with LogDispatch, one offline run"
    import wandb
    import fastai.callback.wandb as fw
    from fastai.callback.wandb import WandbCallback
    res = {'broken': _wandb_config_broken(fw)}
    wandb.init(project='fastxtend-ema-test')
    try:   # fastai on its own, before anything of this package touched it
        fit_quiet(synth_learner(cbs=WandbCallback(log_preds=False)), 1)
        res['plain_crashed'] = False
    except TypeError as e: res['plain_crashed'] = '__dict__' in str(e)
    emitter, ema, probe = Emitter(), EMALogged(0.5, 0.99, finish=0.5), Probe('wandb')
    learn = synth_learner(cbs=[emitter, ema, probe, WandbCallback(log_preds=False)])
    fit_quiet(learn, 2)
    fit_quiet(learn, 1)   # a second fit: W&B's steps go on
    res['patched'] = hasattr(fw.init_args, '__wrapped__')
    wandb.finish()
    res.update(x=emitter.sent, x_valid=emitter.sent_valid, ema_decay=ema.sent, steps=probe.steps, raw_loss=probe.own,
               epoch_steps=probe.epoch_steps, valid_loss=probe.valid_losses)
    Path(out).write_text(json.dumps(res))

def wandb_history(run_file):
    "{step: row} of an offline run's history, read back with the transaction log reader in wandb (`wandb leet inspect`)"
    p = subprocess.run([sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json', run_file],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = {}
    for line in p.stdout.splitlines():
        rec = json.loads(line)
        if rec.get('type') != 'history': continue
        h = rec['history']
        step = int(h['step'].get('num', 0))
        assert step not in rows, f'two history records for step {step}'
        rows[step] = h['item']
    return rows

def test_wandb_offline_run_has_the_values_on_the_loggers_steps(tmp_path):
    env = {**os.environ, 'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true',
           'WANDB_CONSOLE': 'off', 'WANDB_DISABLE_GIT': 'true', 'WANDB_DISABLE_CODE': 'true'}
    env.pop('RANK', None)
    out = tmp_path/'child.json'
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_logging; test_logging._wandb_child({str(out)!r})"
    p = subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    # fastai's crash is seen exactly where the remedy detects it, and the remedy was applied exactly then
    check_eq(res['plain_crashed'], res['broken'])
    check_eq(res['patched'], res['broken'])

    run_files = glob.glob(str(tmp_path/'wandb'/'offline-run-*'/'*.wandb'))
    check_eq(len(run_files), 1)
    rows = wandb_history(run_files[0])
    n = 18   # 2 + 1 epochs of 6 training batches
    check_eq((len(res['steps']), len(res['x']), len(res['ema_decay']), len(res['raw_loss'])), (n, n, n, n))
    first = 0 if res['plain_crashed'] else 6   # a working fastai logged the plain fit's 6 batches first
    check_eq(res['steps'], list(range(first, first+n)))   # one step per batch, going on across the two fits
    for i,s in enumerate(res['steps']):
        row = rows[s]
        check_close(row['raw_loss'], res['raw_loss'][i], eps=1e-6)   # the logger's own row for this batch...
        check_eq(row['x'], res['x'][i])                               # ...holds every value handed over for it
        check_eq(row['probe/neg_x'], -res['x'][i])
        check_close(row['ema_decay'], res['ema_decay'][i], eps=1e-12)
    check_eq(sorted(s for s,r in rows.items() if 'x' in r), res['steps'])   # none dropped, none elsewhere
    assert len(set(res['ema_decay'])) > 5
    # per-epoch values: in the row where WandbCallback put the epoch's validation metrics
    check_eq(res['epoch_steps'], [first+5, first+11, first+17])
    check_eq(len(res['x_valid']), 3)
    for j,s in enumerate(res['epoch_steps']):
        check_eq(rows[s]['x_valid'], res['x_valid'][j])
        check_close(rows[s]['valid_loss'], res['valid_loss'][j], eps=1e-6)
    check_eq(sorted(s for s,r in rows.items() if 'x_valid' in r), res['epoch_steps'])
