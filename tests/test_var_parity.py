"""Parity with the fixtures recorded from the official VAR code (../shared/parity/var)."""
import numpy as np
import pytest

import VAR.vqvae as vqvae
from tests.conftest import require_shared
from VAR.parity import main, run_parity


@pytest.fixture(scope='module')
def fixture_dir():
    return require_shared('parity', 'var')


def test_parity_script_passes(fixture_dir, capsys):
    assert main([str(fixture_dir)]) == 0
    out = capsys.readouterr().out
    assert 'FAIL' not in out and '38/38 checks passed' in out


def test_every_fixture_tensor_is_checked_and_integers_match_exactly(fixture_dir):
    checks = run_parity(fixture_dir)
    names = {(c.file, c.name) for c in checks}
    for required in [('generate', 'idx_BL'), ('encode', 'idx_BL'), ('forward', 'kv_logits_raw'),
                     ('forward', 'block0.attn_out'), ('decode', 'decoder.mid.attn_1_out'), ('generate', 'probs')]:
        assert required in names
    assert all(c.ok for c in checks)
    sampled = [c for c in checks if c.name == 'idx_BL' and c.file == 'generate']
    assert len(sampled) == 3 and all(c.max_abs_diff == 0 for c in sampled)


def test_parity_catches_the_float32_phi_tie_rule(fixture_dir, monkeypatch):
    """Choosing the Phi layer in float32 breaks the 0.5 tie the other way; the checks must notice."""
    ticks64 = vqvae._phi_ticks
    monkeypatch.setattr(vqvae, '_phi_ticks', lambda K: ticks64(K).astype(np.float32))
    failed = {(c.file, c.name) for c in run_parity(fixture_dir) if not c.ok}
    assert ('config', 'phi_index_per_scale') in failed
    assert ('encode', 'f_hat_per_scale') in failed and ('generate', 'image') in failed
