"The benchmark scripts run end to end in their quick mode (a smoke test: no timing is asserted)."
import json, subprocess, sys
import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _run(script, tmp_path, *args):
    out = subprocess.run([sys.executable, str(ROOT/'benchmarks'/script), '--quick', '--out', str(tmp_path), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout

def test_help():
    for script in ('ema_step.py', 'fit_overhead.py'):
        out = subprocess.run([sys.executable, str(ROOT/'benchmarks'/script), '--help'], capture_output=True, text=True)
        assert out.returncode == 0 and '--quick' in out.stdout, out.stderr

def test_ema_step_quick(tmp_path):
    out = _run('ema_step.py', tmp_path)
    assert '| one-pass bound (µs) |' in out and '| fastxtend_ema |' in out and '| timm ModelEmaV3 |' in out
    data = json.loads((tmp_path/'ema_step_cpu_fp32_quick.json').read_text())
    for r in data['rows']:   # every peer ran, side by side (timm's needs torchvision importable)
        for impl in ('fastxtend_ema', 'fastxtend 0.1.7 (foreach)', 'torch AveragedModel', 'ema-pytorch', 'timm ModelEmaV3'):
            assert r[impl] > 0, (impl, r.get(f'{impl} (why)'))
        assert r['bound_us'] > 0
        assert r['fastxtend_ema alloc bytes'] == 0   # no temporary allocated by the step
    assert (tmp_path/'ema_step_cpu_fp32_quick.png').stat().st_size > 1000

def test_ema_step_models(tmp_path):
    "The model list holds timm's backbones, built offline; a name not in it is an error that names it"
    out = _run('ema_step.py', tmp_path, '--models', 'CNN-20k', '--impls', 'fastxtend_ema', 'timm ModelEmaV3', '--name', 'named')
    assert '| timm ModelEmaV3 |' in out and (tmp_path/'named.json').exists()
    bad = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'ema_step.py'), '--models', 'ResNet-5O'], capture_output=True, text=True)
    assert bad.returncode != 0 and 'ResNet-5O' in bad.stderr and 'ResNet-50 (timm)' in bad.stderr, bad.stderr[-2000:]
    sys.path.insert(0, str(ROOT/'benchmarks'))
    try:
        import ema_step
        m = ema_step._timm_models()['ResNet-50 (timm)']()
    finally: sys.path.remove(str(ROOT/'benchmarks'))
    assert 25e6 < sum(p.numel() for p in m.parameters()) < 26e6   # timm's resnet50, random weights

def test_fit_overhead_quick(tmp_path):
    out = _run('fit_overhead.py', tmp_path)
    assert '| fastxtend_ema EMASchedule |' in out
    data = json.loads((tmp_path/'fit_overhead_quick.json').read_text())
    assert {r['variant'] for r in data['rows']} >= {'no EMA', 'fastxtend_ema EMASchedule', 'fastxtend 0.1.7 EMACallback(foreach=True)'}
    assert (tmp_path/'fit_overhead_quick.png').stat().st_size > 1000

@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='with a GPU the script runs the full check (minutes)')
def test_gpu_check_without_cuda(tmp_path):
    "No CUDA here: the script says so, runs its CPU part, and exits 0"
    out = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'gpu_check.py'), '--out', str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith('no CUDA device: the GPU checks did not run')
    report = json.loads((tmp_path/'gpu_check.json').read_text())
    assert report['cuda'] is False and report['cpu_step'][0]['fastxtend_ema alloc bytes'] == 0
