"""Check this implementation against fixtures recorded from the official VAR code.

    python -m VAR.parity DIR [--atol 1e-5] [--rtol 1e-4]

DIR holds config.json (constructor arguments with the official names, sampling settings, RNG protocol) and
generator / tokenizer / forward / generate / encode / decode .safetensors (see the fixtures' README). The
models are built from config.json, loaded strictly, and every recorded call is re-run: the teacher-forced
pass with its block-0 intermediates (SDPA and explicit-matmul attention), the KV-cache path with forced
tokens, CFG generation with the recorded RNG protocol, encoding and decoding. Prints the max abs difference
per tensor; exits 1 if a float tensor is off by more than atol + rtol * |expected| anywhere, if an integer or
boolean tensor differs at all, or if a fixture tensor has no check.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

from .loading import load_into
from .model import VAR
from .sampling import ScaleStep, autoregressive_infer_cfg, make_rng, to_uint8, top_k_top_p_filter
from .vqvae import VQVAE, phi_index

# official constructor arguments that only matter for training or select fused kernels; dropped here
VAR_TRAINING_ONLY = ('drop_rate', 'attn_drop_rate', 'drop_path_rate', 'cond_drop_rate', 'flash_if_available',
                     'fused_if_available')
# tensors of each file that are inputs of the recorded calls, not outputs
INPUTS = {
    'forward': {'class_labels', 'train_labels', 'train_idx_BL', 'kv_idx_BL'},
    'generate': {'class_labels', 'exp_noise'},
    'encode': {'image'},
    'decode': {'idx_BL'},
}


@dataclass
class Check:
    file: str
    name: str
    max_abs_diff: float
    ok: bool
    note: str = ''


class Checker:
    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.checks: List[Check] = []

    def compare(self, file: str, name: str, actual: torch.Tensor, expected: torch.Tensor, note: str = ''):
        actual = actual.detach().cpu()
        if actual.shape != expected.shape:
            self.checks.append(Check(file, name, float('inf'), False, f'shape {tuple(actual.shape)} != {tuple(expected.shape)}'))
            return
        if expected.is_floating_point():
            err = (actual.double() - expected.double()).abs()
            ok = bool((err <= self.atol + self.rtol * expected.double().abs()).all())
        else:
            err = (actual.long() - expected.long()).abs()
            ok = bool((err == 0).all())
            if not ok:
                note = (note + ' ' if note else '') + f'{int((err != 0).sum())} of {err.numel()} differ'
        self.checks.append(Check(file, name, float(err.max()) if err.numel() else 0.0, ok, note))

    def require(self, file: str, name: str, ok: bool, note: str):
        self.checks.append(Check(file, name, 0.0, bool(ok), note))


def build_models(config: dict) -> (VAR, VQVAE):
    tok = config['tokenizer']
    vae = VQVAE(**tok['kwargs'], **{k: v for k, v in tok.get('ddconfig_override', {}).items() if k != 'explanation'})
    gen_kwargs = {k: v for k, v in config['generator']['kwargs'].items() if k not in VAR_TRAINING_ONLY}
    var = VAR(Cvae=vae.Cvae, V=vae.vocab_size, **gen_kwargs)
    return var, vae


def _capture(module: torch.nn.Module, store: Dict[str, torch.Tensor], key: str, what: str = 'output'):
    def hook(_, args, kwargs, output):
        store[key] = (args[0] if what == 'input' else args[1] if what == 'cond' else output).detach().clone()
    return module.register_forward_hook(hook, with_kwargs=True)


def check_forward(var: VAR, vae: VQVAE, fx: dict, cfg: float, c: Checker):
    x_in = vae.quantize.idxBl_to_var_input(fx['train_idx_BL'])
    c.compare('forward', 'x_BLCv_wo_first_l', x_in, fx['x_BLCv_wo_first_l'])

    got: Dict[str, torch.Tensor] = {}
    block0 = var.blocks[0]
    hooks = [_capture(block0, got, 'block0.in_x', 'input'), _capture(block0, got, 'cond_BD', 'cond'),
             _capture(block0.ada_lin, got, 'block0.ada_lin'), _capture(block0.attn, got, 'block0.attn_out'),
             _capture(block0.ffn, got, 'block0.ffn_out'), _capture(block0, got, 'block0.out'),
             _capture(var.head_nm, got, 'head_nm_out')]
    logits = var(fx['train_labels'], fx['x_BLCv_wo_first_l'])
    for h in hooks:
        h.remove()
    c.compare('forward', 'logits_train', logits, fx['logits_train'])
    for name in ('cond_BD', 'block0.ada_lin'):
        c.compare('forward', name, got[name], fx[name])
    for name in ('block0.in_x', 'block0.attn_out', 'block0.ffn_out', 'block0.out', 'head_nm_out'):
        c.compare('forward', name, got[name][:2], fx[name])   # recorded for rows 0-1 only

    var.set_explicit_matmuls(True)
    c.compare('forward', 'logits_train', var(fx['train_labels'], fx['x_BLCv_wo_first_l']), fx['logits_train'],
              note='explicit qk/av matmuls')

    def kv_path():
        steps: List[ScaleStep] = []
        gen = autoregressive_infer_cfg(var, vae, fx['class_labels'], cfg=cfg, top_k=0, top_p=0.0,
                                       forced_idx_BL=fx['kv_idx_BL'],
                                       on_scale=lambda s: steps.append(ScaleStep(s.si, s.pn, s.token_map, s.logits_BlV,
                                                                                 s.guided_BlV, s.idx_Bl, s.f_hat.clone())))
        return gen, steps

    gen, steps = kv_path()
    c.compare('forward', 'kv_logits_raw', torch.cat([s.logits_BlV for s in steps], 1), fx['kv_logits_raw'],
              note='explicit qk/av matmuls')
    var.set_explicit_matmuls(False)

    gen, steps = kv_path()
    c.compare('forward', 'kv_logits_raw', torch.cat([s.logits_BlV for s in steps], 1), fx['kv_logits_raw'])
    c.compare('forward', 'kv_block0_in_x', torch.cat([s.token_map for s in steps], 1), fx['kv_block0_in_x'])
    c.compare('forward', 'kv_f_hat', torch.stack([s.f_hat for s in steps]), fx['kv_f_hat'])
    c.compare('forward', 'kv_image', gen.images, fx['kv_image'])


def check_generate(var: VAR, vae: VQVAE, fx: dict, sampling: dict, c: Checker):
    cfg, top_k, top_p, g_seed = sampling['cfg'], sampling['top_k'], sampling['top_p'], sampling['g_seed']
    labels, idx_ref = fx['class_labels'], fx['idx_BL']

    # teacher-forced with the recorded ids: the guided logits, the filter and the probabilities, step by step
    guided = []
    autoregressive_infer_cfg(var, vae, labels, cfg=cfg, forced_idx_BL=idx_ref,
                             on_scale=lambda s: guided.append(s.guided_BlV))
    guided = torch.cat(guided, dim=1)
    c.compare('generate', 'logits_guided', guided, fx['logits_guided'])
    filtered = top_k_top_p_filter(guided, top_k, top_p)
    c.compare('generate', 'kept_after_top_k_top_p', filtered > -torch.inf, fx['kept_after_top_k_top_p'])
    probs = filtered.softmax(dim=-1)
    c.compare('generate', 'probs', probs, fx['probs'])
    # the sampler's RNG protocol on CPU: multinomial(probs) == argmax(probs / Exp(1) noise)
    c.compare('generate', 'idx_BL', (fx['probs'] / fx['exp_noise']).argmax(-1), idx_ref,
              note='argmax(recorded probs / exp_noise)')
    c.compare('generate', 'idx_BL', (probs / fx['exp_noise']).argmax(-1), idx_ref, note='argmax(our probs / exp_noise)')

    # free-running generation with the official generator protocol (re-seeded with g_seed)
    f_hats = []
    gen = autoregressive_infer_cfg(var, vae, labels, cfg=cfg, top_k=top_k, top_p=top_p, rng=make_rng('cpu', g_seed),
                                   on_scale=lambda s: f_hats.append(s.f_hat.clone()))
    c.compare('generate', 'idx_BL', gen.idx_BL, idx_ref, note=f'sampled with torch.Generator seeded {g_seed}')
    c.compare('generate', 'f_hat', torch.stack(f_hats), fx['f_hat'])
    c.compare('generate', 'image', gen.images, fx['image'])
    c.compare('generate', 'image_uint8', to_uint8(fx['image']).permute(0, 3, 1, 2), fx['image_uint8'],
              note='mul(255).byte() of the recorded image')
    ours_u8 = to_uint8(gen.images).permute(0, 3, 1, 2)
    off_by_one = (ours_u8.long() - fx['image_uint8'].long()).abs().max() <= 1
    c.require('generate', 'image_uint8', off_by_one, 'mul(255).byte() of our image within 1 level (truncation boundary)')


def check_encode(vae: VQVAE, fx: dict, c: Checker):
    image = fx['image']
    c.compare('encode', 'f_BChw', vae.quant_conv(vae.encoder(image)), fx['f_BChw'])
    c.compare('encode', 'idx_BL', torch.cat(vae.img_to_idxBl(image), dim=1), fx['idx_BL'])
    c.compare('encode', 'f_hat_per_scale', torch.stack(vae.quantize.f_to_idxBl_or_fhat(fx['f_BChw'], to_fhat=True)),
              fx['f_hat_per_scale'])
    c.compare('encode', 'recon_from_fhat', vae.img_to_reconstructed_img(image, last_one=True), fx['recon_from_fhat'])
    c.compare('encode', 'recon_from_idx', vae.idxBl_to_img(fx['idx_BL'], same_shape=True, last_one=True), fx['recon_from_idx'])


def check_decode(vae: VQVAE, fx: dict, c: Checker):
    q = vae.quantize
    B = fx['idx_BL'].shape[0]
    ms_h = [q.embedding(idx).transpose(1, 2).reshape(B, vae.Cvae, pn, pn)
            for idx, pn in zip(q.split_scales(fx['idx_BL']), q.v_patch_nums)]
    c.compare('decode', 'f_hat_per_scale', torch.stack(q.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=False)),
              fx['f_hat_per_scale'])
    c.compare('decode', 'decoder_out_raw', vae.decoder(vae.post_quant_conv(fx['f_hat_per_scale'][-1])), fx['decoder_out_raw'])
    got: Dict[str, torch.Tensor] = {}
    hooks = [_capture(vae.decoder.conv_in, got, 'decoder.conv_in_out'),
             _capture(vae.decoder.mid.block_1, got, 'decoder.mid.block_1_out'),
             _capture(vae.decoder.mid.attn_1, got, 'decoder.mid.attn_1_out')]
    image = vae.idxBl_to_img(fx['idx_BL'], same_shape=True, last_one=True)
    for h in hooks:
        h.remove()
    c.compare('decode', 'image', image, fx['image'])
    for name, value in got.items():
        c.compare('decode', name, value, fx[name])


def run_parity(fixture_dir, atol: float = 1e-5, rtol: float = 1e-4) -> List[Check]:
    fixture_dir = Path(fixture_dir)
    config = json.loads((fixture_dir / 'config.json').read_text())
    var, vae = build_models(config)
    load_into(var, load_file(str(fixture_dir / 'generator.safetensors')), str(fixture_dir / 'generator.safetensors'))
    load_into(vae, load_file(str(fixture_dir / 'tokenizer.safetensors')), str(fixture_dir / 'tokenizer.safetensors'))
    fixtures = {name: load_file(str(fixture_dir / f'{name}.safetensors')) for name in INPUTS}

    c = Checker(atol, rtol)
    tok = config['tokenizer']
    SN, K = len(vae.quantize.v_patch_nums), len(vae.quantize.quant_resi.qresi_ls)
    c.require('config', 'phi_index_per_scale', [phi_index(si / (SN - 1), K) for si in range(SN)] == tok['phi_index_per_scale'],
              'Phi index per scale (float64 tie rule)')
    c.require('config', 'phi_index_per_scale_official_10_scales',
              [phi_index(si / 9, 4) for si in range(10)] == tok['phi_index_per_scale_official_10_scales'],
              'Phi index per scale of the released 10-scale models')
    with torch.no_grad():
        check_forward(var, vae, fixtures['forward'], config['sampling']['cfg'], c)
        check_generate(var, vae, fixtures['generate'], config['sampling'], c)
        check_encode(vae, fixtures['encode'], c)
        check_decode(vae, fixtures['decode'], c)

    checked = {(ch.file, ch.name) for ch in c.checks}
    for file, tensors in fixtures.items():
        for name in sorted(set(tensors) - INPUTS[file]):
            if (file, name) not in checked:
                c.require(file, name, False, 'fixture tensor has no check')
    return c.checks


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('fixture_dir', type=Path)
    parser.add_argument('--atol', type=float, default=1e-5)
    parser.add_argument('--rtol', type=float, default=1e-4)
    parser.add_argument('--threads', type=int, default=1, help='CPU threads (the fixtures were recorded with 1)')
    args = parser.parse_args(argv)
    if not (args.fixture_dir / 'config.json').is_file():
        print(f'error: {args.fixture_dir}/config.json not found: pass the folder holding the VAR parity fixtures',
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    checks = run_parity(args.fixture_dir, args.atol, args.rtol)
    width = max(len(f'{ch.file}/{ch.name}') for ch in checks)
    for ch in checks:
        status = 'ok  ' if ch.ok else 'FAIL'
        print(f'{status} {ch.file + "/" + ch.name:<{width}}  max|diff| {ch.max_abs_diff:.3e}  {ch.note}')
    failed = [ch for ch in checks if not ch.ok]
    print(f'{len(checks) - len(failed)}/{len(checks)} checks passed (atol {args.atol:g}, rtol {args.rtol:g})')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
