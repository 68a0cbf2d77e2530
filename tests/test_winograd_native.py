"""The C++ Winograd kernels beyond winograd.py's contract (tests/test_winograd.py runs that on
both): repeatable gradients, jax.vmap, the build and what a failed build says."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from flax_mnist.ops import winograd_native


@pytest.fixture
def native():
  why = winograd_native.unavailable()
  if why.startswith('no C++ compiler'):
    pytest.skip(why)
  assert not why, why
  return winograd_native


def _conv(x, w):
  return winograd_native.winograd_native_conv(x, w, (1, 1), 'VALID')


@pytest.mark.parametrize('r', [3, 5])
def test_gradients_are_repeatable_bit_for_bit(native, r):
  """The kernel gradient sums over images in fixed groups, whichever thread takes which: the
  same inputs give the same bits every time (resume and seeded runs rely on it)."""
  x = jax.random.normal(jax.random.key(0), (23, 14, 14, 32))
  w = jax.random.normal(jax.random.key(1), (r, r, 32, 48)) * 0.1

  @jax.jit
  def grads(x, w):
    y, vjp = jax.vjp(_conv, x, w)
    return vjp(jnp.cos(y))
  first = jax.device_get(grads(x, w))
  for _ in range(6):
    again = jax.device_get(grads(x, w))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
  assert np.abs(first[1]).max() > 0


def test_vmap_runs_each_lane_with_its_own_kernel(native):
  """Several models a pass (config.lanes_per_pass > 1) vmap the custom call over lanes."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 10, 10, 16))
  w = jax.random.normal(jax.random.key(1), (2, 3, 3, 16, 16))
  both = jax.jit(jax.vmap(_conv))(x, w)
  for lane in range(2):
    np.testing.assert_array_equal(both[lane], _conv(x[lane], w[lane]))


def test_transforms_are_generated_from_winograd_transforms():
  header = winograd_native.transforms_header()
  for name in ('in_tf', 'in_tf_t', 'out_tf', 'out_tf_t'):
    assert f'inline void {name}3(' in header and f'inline void {name}5(' in header
  assert '1.5f * d[1][0]' in header  # B^T's (0, 1) entry at the seed's points, in float32.


def test_no_compiler_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv('FLAX_MNIST_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(winograd_native.Unavailable, match='no C\\+\\+ compiler found'):
    winograd_native._build()
  assert not (tmp_path / 'cache').exists()


def test_a_failed_build_says_what_the_compiler_said(monkeypatch, tmp_path):
  compiler = tmp_path / 'bad-c++'
  compiler.write_text('#!/bin/sh\necho "kernel.cc:1:1: error: no such thing" >&2\nexit 1\n')
  compiler.chmod(0o755)
  monkeypatch.setenv('CXX', str(compiler))
  monkeypatch.setenv('FLAX_MNIST_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(winograd_native.Unavailable,
                     match='bad-c\\+\\+ failed to build the kernels: .*error: no such thing'):
    winograd_native._build()
  assert not list((tmp_path / 'cache').rglob('*.so'))  # Nothing half-built is left to load.


def test_asking_for_them_without_a_compiler_is_one_error_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), CXX=str(tmp_path / 'no-such-compiler'),
             FLAX_MNIST_CACHE=str(tmp_path / 'cache'))
  result = subprocess.run(
      [sys.executable, '-m', 'flax_mnist.main', '--config', 'configs/base.py',
       f'--workdir={tmp_path / "w"}', '--config.conv_impl=winograd_native'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      'error: config.conv_impl=winograd_native: no C++ compiler found (install g++ or set '
      'CXX); use conv_impl=winograd.']
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'cache').exists()
