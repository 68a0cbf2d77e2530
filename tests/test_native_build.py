"""Building the C++ kernels: the generated transforms, and what a missing compiler or a failed
build says (one line, nothing written)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from flax_mnist.ops import native_build


def test_transforms_are_generated_from_winograd_transforms():
  header = native_build.transforms_header()
  for name in ('in_tf', 'in_tf_t', 'out_tf', 'out_tf_t'):
    assert f'inline void {name}3(' in header and f'inline void {name}5(' in header
  assert '1.5f * d[1][0]' in header  # B^T's (0, 1) entry at the seed's points, in float32.


def test_no_compiler_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv('FLAX_MNIST_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(native_build.Unavailable, match='no C\\+\\+ compiler found'):
    native_build._build()
  assert not (tmp_path / 'cache').exists()


def test_a_failed_build_says_what_the_compiler_said(monkeypatch, tmp_path):
  compiler = tmp_path / 'bad-c++'
  compiler.write_text('#!/bin/sh\necho "kernel.cc:1:1: error: no such thing" >&2\nexit 1\n')
  compiler.chmod(0o755)
  monkeypatch.setenv('CXX', str(compiler))
  monkeypatch.setenv('FLAX_MNIST_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(native_build.Unavailable,
                     match='bad-c\\+\\+ failed to build the kernels: .*error: no such thing'):
    native_build._build()
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
