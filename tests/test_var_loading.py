"""Strict checkpoint loading and its error messages, with small fake state_dicts (no download)."""
import pytest
import torch

import VAR.loading as loading
from VAR import presets
from VAR.loading import CheckpointError, check_state_dict, load_into, load_var, read_state_dict, resolve_checkpoint


@pytest.fixture(scope='module')
def tiny_state():
    var, vae = presets.create('var_tiny', seed=3)
    return var.state_dict(), vae.state_dict()


def test_strict_load_onto_meta_module_round_trips(tmp_path, tiny_state):
    var_sd, vae_sd = tiny_state
    torch.save(var_sd, tmp_path / 'g.pth')
    var, vae = presets.build('var_tiny', device='meta')
    load_into(var, read_state_dict(tmp_path / 'g.pth'), 'g.pth')
    load_into(vae, vae_sd, 'vae')
    for k, v in var_sd.items():
        assert torch.equal(var.state_dict()[k], v), k
    assert var.lvl_1L.dtype == torch.int64 and not var.training
    assert not any(p.requires_grad for p in var.parameters())


def test_half_precision_file_is_loaded_in_the_model_dtype(tiny_state):
    var_sd, _ = tiny_state
    var, _ = presets.build('var_tiny', device='meta')
    load_into(var, {k: v.half() if v.is_floating_point() else v for k, v in var_sd.items()}, 'half.pth')
    assert var.head.weight.dtype == torch.float32 and var.lvl_1L.dtype == torch.int64


def test_missing_and_unexpected_keys_are_listed(tiny_state):
    var_sd, _ = tiny_state
    var, _ = presets.build('var_tiny', device='meta')
    bad = {k: v for k, v in var_sd.items() if not k.startswith('blocks.1.')}
    bad.update({f'extra.{i}': torch.zeros(1) for i in range(7)})
    with pytest.raises(CheckpointError) as info:
        check_state_dict(var, bad, '/ckpt/var_d16.pth')
    msg = str(info.value)
    assert '/ckpt/var_d16.pth' in msg
    assert 'missing keys: blocks.1.ada_lin.1.bias' in msg and '(13 in total)' in msg
    assert 'unexpected keys: extra.0, extra.1, extra.2, extra.3, extra.4, ... (7 in total)' in msg
    assert 'fix:' in msg


def test_shape_mismatch_is_listed(tiny_state):
    var_sd, _ = tiny_state
    var, _ = presets.build('var_tiny', device='meta')
    bad = dict(var_sd, **{'head.weight': torch.zeros(10, 64)})
    with pytest.raises(CheckpointError, match=r'shape mismatches \(1\): head.weight file \(10, 64\) vs model \(256, 64\)'):
        load_into(var, bad, 'x.pth')


def test_wrong_depth_file_is_rejected_by_load_var(tmp_path, tiny_state):
    """A generator file of another size under the expected name: every difference is reported, nothing loads."""
    var_sd, vae_sd = tiny_state
    torch.save(var_sd, tmp_path / 'var_d16.pth')
    torch.save(vae_sd, tmp_path / 'vae_ch160v4096z32.pth')
    with pytest.raises(CheckpointError) as info:
        load_var(16, ckpt_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / 'var_d16.pth') in msg and 'missing keys: blocks.10.' in msg and 'shape mismatches' in msg


def test_missing_file_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_var(20, ckpt_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / 'var_d20.pth') in msg
    assert 'https://huggingface.co/FoundationVision/var/resolve/main/var_d20.pth' in msg


def test_truncated_file_is_a_clear_error(tmp_path, tiny_state):
    torch.save(tiny_state[0], tmp_path / 'g.pth')
    data = (tmp_path / 'g.pth').read_bytes()
    (tmp_path / 'g.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='could not read checkpoint .*g.pth.*download it again'):
        read_state_dict(tmp_path / 'g.pth')


def test_download_goes_through_huggingface_hub(monkeypatch, tmp_path):
    import huggingface_hub
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return str(tmp_path / filename)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    assert resolve_checkpoint('var_d24.pth') == tmp_path / 'var_d24.pth'
    assert calls == [('FoundationVision/var', 'var_d24.pth')]

    def failing(**kw):
        raise OSError('network is unreachable')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', failing)
    with pytest.raises(CheckpointError, match='network is unreachable.*--ckpt-dir'):
        resolve_checkpoint('var_d24.pth')
    assert loading.HF_REPO == 'FoundationVision/var'


def test_explicit_path_overrides_ckpt_dir(tmp_path):
    (tmp_path / 'mine.pth').write_bytes(b'')
    assert resolve_checkpoint('var_d16.pth', ckpt_dir='/nonexistent', path=tmp_path / 'mine.pth') == tmp_path / 'mine.pth'
