"Every keyword argument the docs pass to a public callable exists in its signature (the house style: no prose naming arguments that do not exist)."
import inspect, json, re
from pathlib import Path
import pytest
import fastxtend_ema
from fastxtend_ema import EMACallback, EMASchedule, BEMACallback
from fastxtend_ema.decay import PowerDecay, ThresholdDecay, ExpDecay

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {'EMACallback': EMACallback, 'EMASchedule': EMASchedule, 'BEMACallback': BEMACallback, 'PowerDecay': PowerDecay,
          'ThresholdDecay': ThresholdDecay, 'ExpDecay': ExpDecay}

def _texts():
    yield 'README.md', (ROOT/'README.md').read_text(encoding='utf-8')
    for nb in sorted((ROOT/'nbs').rglob('*.ipynb')):
        cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
        text = '\n'.join(''.join(c['source']) for c in cells)
        # lines that check a call fails on purpose (bad input) are not documentation
        yield str(nb.relative_to(ROOT)), '\n'.join(l for l in text.splitlines() if 'test_fail' not in l and 'raises' not in l)

def _calls(text, name):
    "Argument strings of `name(...)` calls in `text` (balanced parentheses)"
    for m in re.finditer(rf'\b{name}\(', text):
        i, depth = m.end(), 1
        while i < len(text) and depth:
            depth += {'(': 1, ')': -1}.get(text[i], 0); i += 1
        yield text[m.end():i-1]

def _keywords(args):
    depth, cur, out = 0, '', []
    for ch in args + ',':
        if ch in '([{': depth += 1
        if ch in ')]}': depth -= 1
        if ch == ',' and depth == 0: out.append(cur.strip()); cur = ''
        else: cur += ch
    return [a.split('=')[0].strip() for a in out if re.match(r'^[A-Za-z_]\w*\s*=[^=]', a)]

def test_documented_keywords_exist():
    seen = 0
    for where, text in _texts():
        for name, obj in PUBLIC.items():
            params = set(inspect.signature(obj).parameters)
            for args in _calls(text, name):
                for kw in _keywords(args):
                    seen += 1
                    assert kw in params, f'{where}: {name}({kw}=...) but {name} has no argument {kw!r}'
    assert seen > 30, seen   # the scan found the documentation's calls

def test_schedule_signature_shows_delegated_arguments():
    params = inspect.signature(EMASchedule).parameters
    for kw in ('start_decay', 'final_decay', 'finish', 'schedule', 'validate_ema', 'update_every', 'ema_dtype'):
        assert kw in params
    assert 'decay' not in params and 'half_life' not in params
    params = inspect.signature(BEMACallback).parameters
    for kw in ('ema_power', 'bias_power', 'lag', 'multiplier', 'start', 'update_every', 'min_ema_multiplier', 'ema_device', 'validate_ema', 'skip_ema'):
        assert kw in params
    assert 'decay' not in params and 'half_life' not in params

def test_scan_catches_a_wrong_keyword():
    assert _keywords("decay=0.9, stat=1, x==2, f(a=1)") == ['decay', 'stat']
    assert list(_calls("EMACallback(decay=f(1), bogus=2) EMACallback()", 'EMACallback')) == ['decay=f(1), bogus=2', '']
