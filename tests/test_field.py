"""Real fastai models and real checkpoints: the cases that broke the EMA in the field, each run as a user would.

* Models whose derived weights are non-leaf tensors held as plain attributes (`copy.deepcopy` refuses them):
  fastai's AWD-LSTM language model (`WeightDropout`), `torch.nn.utils.weight_norm`, fastai's
  `ConvLayer(norm_type=NormType.Weight)`, `spectral_norm` after `lr_find`. Each fits, averages the raw parameters,
  validates on weights derived from the EMA's raw ones, and leaves the training weights as a run without EMA has them.
* Tied weights (a head sharing the embedding's weight; `transformers` GPT-2 when it is installed): save, then load
  into a fresh Learner.
* Checkpoints all or nothing: every broken file is refused naming the file, and the Learner is left exactly as it was.
* `SaveModelCallback` reloading the best epoch does not leak EMA state into the next fit; `torch.compile` checkpoints
  load with `ema=True` either way; a Learner without EMA callback runs fastai's own save/load.
* The default decay on a short fit warns, with the numbers (the digits run of the issue that reported it).
"""
import copy, pickle, tempfile, warnings
from pathlib import Path
import pytest
import torch
from torch import nn
from fastai.basics import Learner, Callback, DataLoaders, DataLoader, MSELossFlat, CrossEntropyLossFlat, SGD, Adam
from fastai.callback.tracker import SaveModelCallback
from fastai.layers import ConvLayer, NormType
from fastxtend_ema import EMACallback, EMASchedule
from fastxtend_ema.callback import EMAHorizonWarning
from fastxtend_ema.checkpoint import ema_file, load_ema_weights
from fastxtend_ema.update import select_tensors

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::FutureWarning', 'ignore::DeprecationWarning')


def quiet(learn, n_epoch, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, **kwargs)
    return learn

def state(m:nn.Module) -> dict: return {k:v.detach().clone() for k,v in m.state_dict().items()}

def assert_same(a:dict, b:dict):
    assert list(a) == list(b)
    for k in a: assert torch.equal(a[k], b[k]), k

def xy_dls(x, y, n_train, bs=16):
    ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds[:n_train], bs=bs, shuffle=False), DataLoader(ds[n_train:], bs=bs), device='cpu')

def regression_dls(nf=4, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, nf, generator=g)
    return xy_dls(x, x.sum(1, keepdim=True) + 0.1*torch.randn(n, 1, generator=g), 96)

def valid_loss(model, dls, loss_func) -> float:
    model.eval()
    with torch.no_grad():
        tot = [(loss_func(model(x), y).item()*len(x), len(x)) for x,y in dls.valid]
    return sum(a for a,_ in tot)/sum(n for _,n in tot)


# ----------------------------------------------------------------------------- derived weights (non-leaf tensors)

def lm_dls(vocab=40, seq=10, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    return xy_dls(x, torch.roll(x, -1, 1), 64)

def awd_lstm_learner(cbs, seed=0):
    from fastai.text.models.core import get_language_model
    from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_lm_config
    from fastai.callback.rnn import ModelResetter, RNNCallback
    torch.manual_seed(seed)
    model = get_language_model(AWD_LSTM, 40, config=dict(awd_lstm_lm_config, emb_sz=16, n_hid=24, n_layers=2))
    return Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, lr=1e-2,
                   cbs=[ModelResetter(), RNNCallback()] + cbs, path=tempfile.mkdtemp(prefix='fxema_'))

def weight_norm_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 16)), nn.ReLU(), nn.utils.weight_norm(nn.Linear(16, 1)))

def conv_weight_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 2, 2)), ConvLayer(1, 8, ks=2, norm_type=NormType.Weight), nn.Flatten(),
                         nn.Linear(8, 1))

def spectral_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 16)), nn.ReLU(), nn.Linear(16, 1))

def regression_learner(model, cbs):
    return Learner(regression_dls(), model, loss_func=MSELossFlat(), opt_func=SGD, lr=0.05, cbs=cbs,
                   path=tempfile.mkdtemp(prefix='fxema_'))

CASES = {
    'awd_lstm': (lambda cbs: awd_lstm_learner(cbs), ['0.rnns.0.weight_hh_l0_raw', '0.rnns.1.weight_hh_l0_raw']),
    'weight_norm': (lambda cbs: regression_learner(weight_norm_model(), cbs), ['0.weight_g', '0.weight_v', '2.weight_g']),
    'conv_weight_norm': (lambda cbs: regression_learner(conv_weight_model(), cbs), ['1.0.weight_g', '1.0.weight_v']),
    'spectral_norm': (lambda cbs: regression_learner(spectral_model(), cbs), ['0.weight_orig', '0.weight_u', '0.weight_v']),
}

@pytest.mark.parametrize('case', list(CASES))
def test_derived_weights(case):
    make, raw_names = CASES[case]
    with_ema, plain = make([EMACallback(decay=0.8)]), make([])
    if case == 'spectral_norm':   # lr_find's forward passes with gradients leave `weight` a non-leaf tensor
        for learn in (with_ema, plain):
            with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=5, show_plot=False)
    for learn in (with_ema, plain):
        torch.manual_seed(1); quiet(learn, 2)   # dropout draws the same masks in both runs
    # the EMA averages the raw parameters (and floating buffers)
    avg, _ = select_tensors(with_ema.model)
    assert set(raw_names) <= set(avg), (raw_names, avg)
    assert any(not torch.equal(with_ema.model_ema.state_dict()[n], with_ema.model.state_dict()[n]) for n in raw_names)
    # the training weights are those of the same run without EMA
    assert_same(state(with_ema.model), state(plain.model))
    # validation ran on weights derived from the EMA's raw ones: the recorded loss is the EMA module's own, computed
    # standalone, and the loss of a fresh model given the EMA's state
    recorded = with_ema.recorder.values[-1][1]
    loss_func = with_ema.loss_func
    ema = with_ema.model_ema
    if hasattr(ema, 'reset'): ema.reset()
    fresh = make([]).model
    fresh.load_state_dict(ema.state_dict())
    if hasattr(fresh, 'reset'): fresh.reset()
    if case != 'awd_lstm':   # an LM validates with fastai's RNN callbacks (hidden state carried over batches)
        assert abs(valid_loss(ema, with_ema.dls, loss_func) - recorded) < 1e-5
        assert abs(valid_loss(fresh, with_ema.dls, loss_func) - recorded) < 1e-5
    else:
        for learn_model in (ema, fresh):
            probe = awd_lstm_learner([])
            probe.model = learn_model
            with probe.no_bar(), probe.no_logging(): got = probe.validate()[0]
            assert abs(got - recorded) < 1e-5, (got, recorded)
    assert case == 'awd_lstm' or abs(valid_loss(plain.model, plain.dls, loss_func) - recorded) > 1e-6

def test_weight_norm_ema_module_computes_its_weight():
    "`learn.model_ema` used on its own (inference) derives `weight` from its own averaged `weight_g`/`weight_v`"
    learn = quiet(regression_learner(weight_norm_model(), [EMACallback(decay=0.5)]), 2)
    ema = learn.model_ema
    g, v = ema[0].weight_g, ema[0].weight_v
    with torch.no_grad(): ema(torch.zeros(1, 4))
    torch.testing.assert_close(ema[0].weight, g*v/v.norm(dim=1, keepdim=True))


# ----------------------------------------------------------------------------- tied weights

class TiedLM(nn.Module):
    "A head sharing the embedding's weight"
    def __init__(self, vocab=40, nf=16):
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(vocab, nf), nn.Linear(nf, nf), nn.Linear(nf, vocab, bias=False)
        self.head.weight = self.emb.weight
    def forward(self, x): return self.head(torch.tanh(self.mix(self.emb(x))))

def gpt2_tied(seed=0):
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True)
    m = transformers.GPT2LMHeadModel(cfg)
    class Logits(nn.Module):
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, x): return self.m(x).logits
    return Logits(m)

@pytest.mark.parametrize('make', [TiedLM, gpt2_tied], ids=['torch', 'gpt2'])
def test_tied_weights_save_and_load(make, tmp_path):
    def learner(cbs): 
        torch.manual_seed(0)
        return Learner(lm_dls(), make(), loss_func=CrossEntropyLossFlat(), opt_func=Adam, lr=1e-2, cbs=cbs, path=tmp_path)
    learn = quiet(learner([EMACallback(decay=0.8)]), 2)
    sd = learn.model.state_dict()
    assert len(sd) > len(dict(learn.model.named_parameters())) + len(dict(learn.model.named_buffers())) - 1   # tied: listed twice
    learn.save('tied')
    for cbs in ([EMACallback(decay=0.8)], []):
        back = learner(cbs)
        back.load('tied')
        assert_same(state(back.model), state(learn.model))
        if cbs: assert_same(state(back.model_ema), state(learn.model_ema))
    inf = load_ema_weights(learner([]), 'tied')
    assert_same(state(inf.model), state(learn.model_ema))
    # the EMA keeps the tie: one tensor under both names
    ema_ptrs = {p.data_ptr() for p in learn.model_ema.parameters()}
    assert len(ema_ptrs) == len(list(learn.model_ema.parameters()))


# ----------------------------------------------------------------------------- checkpoints: all or nothing

def snapshot(learn) -> dict:
    "Everything a failed load must leave as it was"
    cb = learn.ema
    return dict(model=state(learn.model), model_ema=state(learn.model_ema) if hasattr(learn, 'model_ema') else None,
                model_ema_obj=learn.__dict__.get('model_ema'), opt=None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
                opt_obj=learn.opt, cbs=list(learn.cbs), loaded=cb._loaded, averager=cb.averager,
                counters=(cb.steps, cb.updates, cb.started))

def assert_unchanged(before:dict, learn):
    after = snapshot(learn)
    assert_same(before['model'], after['model'])
    assert (before['model_ema'] is None) == (after['model_ema'] is None)
    if before['model_ema'] is not None: assert_same(before['model_ema'], after['model_ema'])
    for k in ('model_ema_obj', 'opt_obj', 'loaded', 'averager'): assert before[k] is after[k], k
    assert before['cbs'] == after['cbs'] and before['counters'] == after['counters']
    if before['opt'] is not None: assert repr(before['opt']) == repr(after['opt'])

def _saved(tmp_path):
    learn = quiet(regression_learner(spectral_model(), [EMACallback(decay=0.8)]), 1)
    learn.path = tmp_path
    learn.save('good')
    return learn, tmp_path/'models'

BROKEN = {
    'truncated EMA file': lambda d: (d/'bad.ema.pth').write_bytes((d/'good.ema.pth').read_bytes()[:200]),
    'pickled object in EMA file': lambda d: torch.save({'tensors': Path('x'), 'format': 2}, d/'bad.ema.pth'),
    'EMA format from the future': lambda d: torch.save({**torch.load(d/'good.ema.pth', weights_only=True), 'format': 99}, d/'bad.ema.pth'),
    'EMA file with other keys': lambda d: torch.save({'weights': torch.zeros(2)}, d/'bad.ema.pth'),
    'EMA of another shape': lambda d: torch.save({**torch.load(d/'good.ema.pth', weights_only=True),
                                                  'tensors': {k:torch.zeros(3) for k in torch.load(d/'good.ema.pth', weights_only=True)['tensors']}}, d/'bad.ema.pth'),
    'empty EMA file': lambda d: (d/'bad.ema.pth').write_bytes(b''),
    'truncated model file': lambda d: ((d/'bad.pth').write_bytes((d/'good.pth').read_bytes()[:300]),
                                       (d/'bad.ema.pth').write_bytes((d/'good.ema.pth').read_bytes())),
}

@pytest.mark.parametrize('case', list(BROKEN))
def test_broken_checkpoint_changes_nothing(case, tmp_path):
    src, d = _saved(tmp_path)
    import shutil
    if not (d/'bad.pth').exists(): shutil.copy(d/'good.pth', d/'bad.pth')
    BROKEN[case](d)
    if not (d/'bad.pth').exists(): shutil.copy(d/'good.pth', d/'bad.pth')
    for fitted in (False, True):   # a fresh Learner, and one in the middle of its training (optimizer, EMA, model_ema)
        learn = regression_learner(spectral_model(seed=1), [EMACallback(decay=0.8)])
        learn.path = tmp_path
        if fitted: quiet(learn, 1)
        before = snapshot(learn)
        with pytest.raises((ValueError, RuntimeError)) as e: learn.load('bad')
        assert 'bad.ema.pth' in str(e.value) or (case == 'truncated model file' and 'bad.pth' in str(e.value)), str(e.value)
        assert_unchanged(before, learn)

def test_plain_state_dict_is_taken_as_ema_weights(tmp_path):
    "What `torch.save(learn.model_ema.state_dict(), ...)` writes: the EMA weights, with a warning that counters are missing"
    learn, d = _saved(tmp_path)
    torch.save(learn.model_ema.state_dict(), d/'good.ema.pth')
    back = regression_learner(spectral_model(seed=1), [EMACallback(decay=0.8)])
    back.path = tmp_path
    with pytest.warns(UserWarning, match='good.ema.pth holds EMA weights without counters'): back.load('good')
    assert_same(state(back.model_ema), state(learn.model_ema))

def test_compiled_and_plain_checkpoints_load_with_ema_true(tmp_path):
    def learner(compiled):
        learn = regression_learner(spectral_model(), [EMACallback(decay=0.8)])
        learn.path = tmp_path
        if compiled: learn.model = torch.compile(learn.model)
        return learn
    for saved_compiled in (True, False):
        src = learner(saved_compiled)
        src.ema._setup()   # what before_fit does; the compiled model is never run (saving and loading only read tensors)
        with torch.no_grad():
            for p in src.ema.averager.module.parameters(): p.add_(1.)
        src.save('ck')
        assert any(k.startswith('_orig_mod.') for k in torch.load(tmp_path/'models/ck.pth', weights_only=True)) == saved_compiled
        for load_compiled in (True, False):
            dst = learner(load_compiled)
            dst.load('ck', ema=True)
            got = state(dst.model._orig_mod if load_compiled else dst.model)
            assert_same(got, state(src.ema.averager.module))

def test_save_model_callback_leaves_no_ema_for_the_next_fit(tmp_path):
    "The best epoch's EMA is reloaded at the end of fit, and a later fit without resume starts anew, with its `start` delay"
    def run(tracker):
        learn = regression_learner(spectral_model(), [EMACallback(decay=0.8, start=1)])
        learn.path = tmp_path
        quiet(learn, 3, cbs=[SaveModelCallback(fname='best')] if tracker else [])
        if tracker:   # the reloaded best epoch's EMA is learn.model_ema
            st = torch.load(tmp_path/'models/best.ema.pth', weights_only=True)['tensors']
            assert_same(state(learn.model_ema), st)
        w0 = state(learn.model)
        quiet(learn, 2)
        return learn, w0
    tracked, w0 = run(True)
    assert tracked.ema.started and tracked.ema.updates == 6   # the second fit: epoch 1 of 2, 6 steps after its start
    plain, _ = run(False)
    assert (plain.ema.steps, plain.ema.updates) == (tracked.ema.steps, tracked.ema.updates)
    assert tracked.ema._loaded is None

def test_learner_without_ema_runs_fastai_save_and_load(tmp_path):
    "Same files, same errors as plain fastai: its methods are the class's own"
    plain = regression_learner(spectral_model(), [])
    with_ema = regression_learner(spectral_model(), [EMACallback()])
    assert 'save' not in plain.__dict__ and 'load' not in plain.__dict__
    assert Learner.__dict__['save'].__module__ == 'fastai.learner' and Learner.__dict__['load'].__module__ == 'fastai.learner'
    assert 'save' in with_ema.__dict__
    with_ema.remove_cb(with_ema.ema)
    assert 'save' not in with_ema.__dict__ and 'load' not in with_ema.__dict__
    plain.path = tmp_path
    assert plain.save('p') == tmp_path/'models/p.pth' and sorted(p.name for p in (tmp_path/'models').iterdir()) == ['p.pth']
    with pytest.raises(FileNotFoundError): plain.load('missing')
    # pickled with its Learner (export) and back: the EMA save/load go with it
    learn = quiet(regression_learner(spectral_model(), [EMACallback(decay=0.8)]), 1)
    back = pickle.loads(pickle.dumps(learn))
    back.path = tmp_path
    back.save('pickled')
    assert (tmp_path/'models/pickled.ema.pth').exists()


# ----------------------------------------------------------------------------- the default decay on a short fit

def test_default_decay_on_a_short_fit_warns_with_the_numbers():
    "The issue's run: `EMACallback()` on 3 epochs of digits (252 steps) validated at accuracy 0.149"
    from fastxtend_ema.demo import digits_dls, digits_cnn
    from fastai.metrics import accuracy
    learn = Learner(digits_dls(bs=16), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy,
                    cbs=EMACallback(), path=tempfile.mkdtemp(prefix='fxema_'))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.ema._check_horizon(3, len(learn.dls.train))
    msgs = [str(o.message) for o in w if issubclass(o.category, EMAHorizonWarning)]
    assert len(msgs) == 1 and '252 training batches' in msgs[0] and 'about 5,000 steps' in msgs[0], msgs
    assert 'PostHocEMA' in msgs[0] and 'half_life=13' in msgs[0] and '95%' in msgs[0], msgs
