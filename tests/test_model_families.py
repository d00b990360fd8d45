"""fastai's model families, built by fastai's own factories (`pretrained=False`) on data made here, used as a user would.

For each: `learn.model_ema` used on its own computes what the training model computes with the EMA's weights loaded,
for two batch sizes (the one it trained with and another), after the workflows a user runs (`lr_find`, `fit`,
`fine_tune`, `validate`, `get_preds`). The families: a torchvision ResNet (`vision_learner`), a timm model, a U-Net
(`unet_learner`: its skip connections are fed by forward hooks the model owns), AWD-LSTM classifier and language model,
tabular, `weight_norm` (both APIs) and `spectral_norm` layers, and a `transformers` model built from a config.
The U-Net's EMA also gets its BatchNorm statistics recomputed (`recompute_bn`) as the same model with those weights.
Hooks the model does not own (a user's) stay on the training model and are not called by the EMA.
"""
import threading, warnings
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from PIL import Image
from fastai.basics import Learner, CrossEntropyLossFlat
from fastai.metrics import accuracy, mae, foreground_acc
from fastai.vision.all import (vision_learner, unet_learner, resnet18, ImageDataLoaders, SegmentationDataLoaders,
                               ConvLayer, Flatten)
from fastai.vision.models.unet import DynamicUnet
from fastai.text.all import (TextBlock, CategoryBlock, DataBlock, ColReader, RandomSplitter, BaseTokenizer, AWD_LSTM,
                             awd_lstm_lm_config, awd_lstm_clas_config, language_model_learner, text_classifier_learner)
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize, RegressionBlock
from fastxtend_ema.callback import EMACallback, recompute_bn
from fastxtend_ema.posthoc import PostHocEMA
from fastxtend_ema.test_utils import synth_learner, fit_quiet

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::FutureWarning', 'ignore::DeprecationWarning')

@pytest.fixture(autouse=True)
def no_onednn():
    "oneDNN builds kernels for each new convolution shape, seconds each on a busy CPU: tiny models run faster without"
    with torch.backends.mkldnn.flags(enabled=False): yield


def quiet(learn, method='fit', *args, **kwargs):
    "Run `learn.method(*args, **kwargs)` without progress bar or table"
    with learn.no_bar(), learn.no_logging(): return getattr(learn, method)(*args, **kwargs)

def tensors(o) -> list:
    "The tensors of a model output (a tensor, or nested tuples/lists of them)"
    if isinstance(o, torch.Tensor): return [o]
    return [t for v in o for t in tensors(v)] if isinstance(o, (tuple, list)) else []

def run(model, xb):
    "`model(*xb)` in eval mode without gradients, its hidden state reset first (AWD-LSTM)"
    model.eval()
    if hasattr(model, 'reset'): model.reset()
    with torch.no_grad(): return tensors(model(*xb))

def assert_ema_is_model(learn, batches):
    "`learn.model_ema` on each batch equals the training model run with the EMA's weights loaded; the model is put back"
    model, ema = learn.model, learn.model_ema
    assert len({len(xb[0]) for xb in batches}) == len(batches), 'the batches must differ in size'
    keep, was = {k:v.detach().clone() for k,v in model.state_dict().items()}, model.training
    got = [run(ema, xb) for xb in batches]   # the EMA first: what it computes must not depend on the model's state
    try:
        model.load_state_dict(ema.state_dict())
        want = [run(model, xb) for xb in batches]
    finally: model.load_state_dict(keep); model.train(was)
    for g,w in zip(got, want):
        assert len(g) == len(w) > 0
        for a,b in zip(g, w): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

def two_sizes(xb, n=2):
    "The batch `xb` (a tuple of inputs) and its first `n` rows: two batch sizes"
    return [tuple(xb), tuple(x[:n] for x in xb)]

def diverged(learn) -> bool:
    "The EMA differs from the training weights (so comparing them tells the two apart)"
    m, e = learn.model.state_dict(), learn.model_ema.state_dict()
    return any(v.is_floating_point() and not torch.equal(v, e[k]) for k,v in m.items())


# ----------------------------------------------------------------------------- vision: images written with PIL

def write_images(path, n=12, size=32, masks=False):
    "`n` random RGB images (labels `a`/`b` in their names) written as PNGs, with a two-class mask each if `masks`"
    rng = np.random.default_rng(0)
    fns = []
    for i in range(n):
        a = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(fn := path/f'{"ab"[i%2]}_{i}.png'); fns.append(fn)
        if masks: Image.fromarray((a[..., 0] > 127).astype(np.uint8)).save(path/f'{i}_mask.png')
    return fns

def image_dls(path):
    "An image classification `DataLoaders` on 16x16 images"
    fns = write_images(path, n=8, size=16)   # one training batch of 4 (fastai drops the last, partial one)
    return ImageDataLoaders.from_name_func(path, fns, lambda name: name[0], valid_pct=0.25, seed=0, bs=4,
                                          num_workers=0, device='cpu')

def tiny_arch(pretrained=False):
    "A small CNN for `unet_learner` to cut its encoder from (three stride-2 convolutions, then a pooled head)"
    return nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 16, stride=2), ConvLayer(16, 16, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(16, 2))

def unet(path, cbs=None):
    "`unet_learner` on 32x32 images and masks, with an `EMACallback` unless other `cbs` are given"
    fns = write_images(path, masks=True)
    dls = SegmentationDataLoaders.from_label_func(path, fns, lambda f: path/f'{f.stem.split("_")[1]}_mask.png',
                                                  codes=['a', 'b'], valid_pct=0.25, seed=0, bs=4, num_workers=0,
                                                  device='cpu')
    return unet_learner(dls, tiny_arch, pretrained=False, n_out=2, cbs=cbs or EMACallback(decay=0.5))

def test_unet_ema_reads_its_own_skip_connections(tmp_path):
    "The U-Net's EMA runs its own copies of the hooks that feed its skip connections, on any batch size"
    learn = unet(tmp_path)
    assert isinstance(learn.model, DynamicUnet) and len(learn.model.sfs) >= 2
    quiet(learn, 'fit', 1)
    assert diverged(learn)
    xb = learn.dls.one_batch()[:1]
    assert_ema_is_model(learn, two_sizes(xb) + [(torch.cat([xb[0], xb[0][:2]]),)])
    # the EMA's hooks are registered on the EMA's encoder and store into the EMA's own `Hook`s
    ema, model = learn.model_ema, learn.model
    assert all(h is not g and not h.removed for h,g in zip(ema.sfs, model.sfs))
    assert [b.hook for b in ema.modules() if hasattr(b, 'hook') and hasattr(b, 'shuf')] == list(ema.sfs)
    before = list(model.sfs.stored)
    run(ema, xb)
    assert all(a is b for a,b in zip(model.sfs.stored, before)), "the EMA's forward wrote into the model's hooks"
    assert all(h.stored.shape[0] == len(xb[0]) for h in ema.sfs)

def test_unet_lr_find_fine_tune_validate_get_preds(tmp_path):
    "`lr_find` leaves activations with gradients in the model's hooks: the EMA is still made, and stays right"
    learn = unet(tmp_path)
    quiet(learn, 'lr_find', num_it=3, show_plot=False, suggest_funcs=())
    assert not all(s.is_leaf for s in learn.model.sfs.stored)   # what made the copy fail
    quiet(learn, 'fine_tune', 1, freeze_epochs=1)
    quiet(learn, 'validate'); quiet(learn, 'get_preds')
    assert diverged(learn)
    assert_ema_is_model(learn, two_sizes(learn.dls.one_batch()[:1]))

def test_unet_recompute_bn(tmp_path):
    "`recompute_bn` on the U-Net's EMA gives the statistics (and outputs) of the same model with the EMA's weights"
    learn = unet(tmp_path)
    quiet(learn, 'fit', 1)
    batches = [learn.dls.train.one_batch() for _ in range(2)]   # the same inputs for both
    model, ema = learn.model, learn.model_ema
    keep, was = {k:v.detach().clone() for k,v in model.state_dict().items()}, model.training
    try:
        model.load_state_dict(ema.state_dict())
        recompute_bn(model, batches); recompute_bn(ema, batches)
        want, got = model.state_dict(), ema.state_dict()
        assert any('running_mean' in k and not torch.equal(want[k], keep[k]) for k in want)
        for k in want: torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
        xb = batches[0][:1]
        torch.testing.assert_close(run(ema, xb), run(model, xb), rtol=1e-5, atol=1e-5)
    finally: model.load_state_dict(keep); model.train(was)

def test_unet_posthoc_sweep_recompute_bn(tmp_path):
    "The post-hoc EMA's rebuilt U-Nets get their BatchNorm statistics recomputed on training batches, then validated"
    learn = unet(tmp_path, PostHocEMA(sigma_rels=(0.05, 0.1), snapshot_every=1))
    quiet(learn, 'fit', 1)
    with learn.no_bar(), learn.no_logging(): rows = learn.post_hoc_ema.sweep([0.05, 0.1], recompute_bn=True, ax=False)
    assert list(rows.sigma_rel) == [0.05, 0.1] and np.isfinite(rows.valid_loss).all()
    m = learn.post_hoc_ema.synthesize(0.1)
    xb = learn.dls.one_batch()[:1]
    keep, was = {k:v.detach().clone() for k,v in learn.model.state_dict().items()}, learn.model.training
    try:
        learn.model.load_state_dict(m.state_dict())
        for b in two_sizes(xb): torch.testing.assert_close(run(m, b), run(learn.model, b), rtol=1e-5, atol=1e-5)
    finally: learn.model.load_state_dict(keep); learn.model.train(was)

class Logger:
    "A user's activation logger: a bound-method hook whose owner the model does not reach (and holds a lock)"
    def __init__(self): self.lock,self.means = threading.Lock(),[]
    def record(self, m, i, o):
        with self.lock: self.means.append(o.mean().item())

def test_resnet_user_hook_validate_get_preds(tmp_path):
    "torchvision's ResNet through `vision_learner`; a user's hook on the model stays the user's: not copied, not called"
    learn = vision_learner(image_dls(tmp_path), resnet18, pretrained=False, cbs=EMACallback(decay=0.5))
    logger = Logger()
    handle = learn.model[0].register_forward_hook(logger.record)
    try:
        quiet(learn, 'fit', 1)   # the EMA is made while the hook is registered
        assert not learn.model_ema[0]._forward_hooks and len(learn.model[0]._forward_hooks) == 1
        n = len(logger.means)
        run(learn.model_ema, learn.dls.one_batch()[:1])
        assert len(logger.means) == n > 0, "the EMA's forward called the user's hook"
    finally: handle.remove()
    quiet(learn, 'validate'); quiet(learn, 'get_preds')
    assert diverged(learn)
    assert_ema_is_model(learn, two_sizes(learn.dls.one_batch()[:1]))

def test_timm_model_lr_find_fit(tmp_path):
    "A timm model by name through `vision_learner`, after `lr_find`"
    learn = vision_learner(image_dls(tmp_path), 'resnet10t', pretrained=False, cbs=EMACallback(decay=0.5))
    quiet(learn, 'lr_find', num_it=3, show_plot=False, suggest_funcs=())
    quiet(learn, 'fit', 1)
    assert diverged(learn)
    assert_ema_is_model(learn, two_sizes(learn.dls.one_batch()[:1]))


# ----------------------------------------------------------------------------- text: AWD-LSTM

WORDS = 'the a cat dog sat ran on under mat log red blue big small'.split()

def text_df(n=48, seed=0):
    rng = np.random.default_rng(seed)
    texts = [' '.join(rng.choice(WORDS, rng.integers(6, 14))) for _ in range(n)]
    return pd.DataFrame({'text': texts, 'label': ['pos' if 'cat' in t else 'neg' for t in texts]})

def text_dls(is_lm):
    blocks = TextBlock.from_df('text', is_lm=is_lm, tok=BaseTokenizer(), min_freq=1, n_workers=0, seq_len=8)
    db = DataBlock(blocks=blocks if is_lm else (blocks, CategoryBlock), get_x=ColReader('text'),
                   get_y=None if is_lm else ColReader('label'), splitter=RandomSplitter(0.25, seed=0))
    return db.dataloaders(text_df(), bs=8, seq_len=8, num_workers=0, device='cpu')

TINY_AWD = dict(emb_sz=16, n_hid=24, n_layers=2)

def test_awd_lstm_language_model():
    learn = language_model_learner(text_dls(True), AWD_LSTM, pretrained=False, config=dict(awd_lstm_lm_config, **TINY_AWD),
                                   cbs=EMACallback(decay=0.5))
    quiet(learn, 'lr_find', num_it=3, show_plot=False, suggest_funcs=())
    quiet(learn, 'fit', 1)
    assert diverged(learn)
    assert_ema_is_model(learn, two_sizes(learn.dls.one_batch()[:1]))

def test_awd_lstm_classifier():
    learn = text_classifier_learner(text_dls(False), AWD_LSTM, pretrained=False, seq_len=8,
                                    config=dict(awd_lstm_clas_config, **TINY_AWD), cbs=EMACallback(decay=0.5))
    quiet(learn, 'fit', 1)
    quiet(learn, 'get_preds')
    assert diverged(learn)
    assert_ema_is_model(learn, two_sizes(learn.dls.one_batch()[:1]))


# ----------------------------------------------------------------------------- tabular, weight-norm, transformers

def test_tabular():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({'a': rng.normal(size=64), 'b': rng.normal(size=64), 'c': rng.choice(list('xyz'), 64)})
    df['y'] = (df.a + (df.c == 'x')).astype('float32')
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=['c'], cont_names=['a', 'b'],
                                     y_names='y', y_block=RegressionBlock(), bs=16, valid_idx=list(range(48, 64)), device='cpu', num_workers=0)
    learn = tabular_learner(dls, layers=[8, 8], n_out=1, cbs=EMACallback(decay=0.5))
    quiet(learn, 'fit', 1)
    assert diverged(learn)
    assert_ema_is_model(learn, two_sizes(learn.dls.one_batch()[:2]))

def weight_normed(kind):
    from torch.nn.utils import parametrizations, spectral_norm, weight_norm
    wrap = {'parametrizations.weight_norm': parametrizations.weight_norm, 'weight_norm': weight_norm,
            'spectral_norm': spectral_norm, 'parametrizations.spectral_norm': parametrizations.spectral_norm}[kind]
    torch.manual_seed(0)
    return nn.Sequential(wrap(nn.Linear(4, 16)), nn.BatchNorm1d(16), nn.ReLU(), wrap(nn.Linear(16, 1)))

@pytest.mark.parametrize('kind', ['parametrizations.weight_norm', 'weight_norm', 'spectral_norm',
                                  'parametrizations.spectral_norm'])
def test_weight_and_spectral_norm(kind):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)   # the old `weight_norm` API is the point of one case
        learn = synth_learner([EMACallback(decay=0.5)], model=weight_normed(kind))
    quiet(learn, 'lr_find', num_it=3, show_plot=False, suggest_funcs=())   # forwards with gradients: derived weights are non-leaf
    fit_quiet(learn, 1)
    assert diverged(learn)
    assert_ema_is_model(learn, two_sizes(learn.dls.one_batch()[:1]))

class HFClassifier(nn.Module):
    "A `transformers` model whose forward returns the logits, as a fastai `Learner` wants"
    def __init__(self, model): super().__init__(); self.model = model
    def forward(self, x): return self.model(input_ids=x).logits

def test_transformers_model():
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = HFClassifier(transformers.BertForSequenceClassification(cfg))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 40, (48, 10), generator=g)
    from fastai.basics import DataLoaders, DataLoader
    ds = list(zip(x, (x[:, 0] < 20).long()))
    dls = DataLoaders(DataLoader(ds[:32], bs=8, shuffle=True), DataLoader(ds[32:], bs=8), device='cpu')
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), lr=1e-2, cbs=EMACallback(decay=0.5))
    quiet(learn, 'fit', 1)
    assert diverged(learn)
    assert_ema_is_model(learn, two_sizes(learn.dls.one_batch()[:1]))


# ----------------------------------------------------------------------------- issue 17.1: EMA columns are fastai's scores

def assert_columns_are_fastais(learn):
    "The last epoch's `ema_*` columns equal fastai's own `validate()` of the model with the EMA's weights loaded"
    names = list(learn.recorder.metric_names[1:])
    row = dict(zip(names, learn.recorder.values[-1]))
    keep = {k:v.detach().clone() for k,v in learn.model.state_dict().items()}
    try:
        learn.model.load_state_dict(learn.model_ema.state_dict())
        ref = quiet(learn, 'validate')
    finally: learn.model.load_state_dict(keep)
    want = dict(zip(['valid_loss'] + [m.name for m in learn.metrics], ref))
    assert set(want) and all(f'ema_{k}' in row for k in want), (names, want)
    for k,v in want.items(): assert abs(row[f'ema_{k}'] - v) <= 1e-4*max(1., abs(v)), (k, row[f'ema_{k}'], v)

@pytest.mark.parametrize('family', ['vision', 'unet', 'tabular'])
def test_both_columns_are_fastais_validation(tmp_path, family):
    "`validate_ema='both'`: each `ema_*` column is what fastai's validation of the EMA weights gives, for each family"
    cb = EMACallback(decay=0.5, validate_ema='both')
    if family == 'vision':
        learn = vision_learner(image_dls(tmp_path), resnet18, pretrained=False, metrics=accuracy, cbs=cb)
    elif family == 'unet': learn = unet(tmp_path, cbs=cb); learn.metrics = [foreground_acc]
    else:
        rng = np.random.default_rng(0)
        df = pd.DataFrame({'a': rng.normal(size=64), 'b': rng.normal(size=64), 'c': rng.choice(list('xyz'), 64)})
        df['y'] = (df.a + (df.c == 'x')).astype('float32')
        dls = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=['c'], cont_names=['a', 'b'],
                                         y_names='y', y_block=RegressionBlock(), bs=16, valid_idx=list(range(48, 64)),
                                         device='cpu', num_workers=0)
        learn = tabular_learner(dls, layers=[8, 8], n_out=1, metrics=mae, cbs=cb)
    quiet(learn, 'fit', 2)
    assert diverged(learn)
    assert_columns_are_fastais(learn)
