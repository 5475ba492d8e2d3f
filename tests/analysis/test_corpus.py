"""The built-in corpus is the same list whatever the calling process has imported or patched."""

import logging
import warnings

from moec.analysis import corpus


def test_sentences_do_not_depend_on_the_calling_process(monkeypatch):
    corpus.stdlib_sentences.cache_clear()
    before = corpus.stdlib_sentences()

    def warning_advice(self, message):
        """Log a warning that the user can silence with an environment variable of this package."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        """Show a warning through this application's own console, with colours."""

    monkeypatch.setattr(logging.Logger, "warning_advice", warning_advice, raising=False)
    monkeypatch.setattr(warnings, "showwarning", showwarning)
    corpus.stdlib_sentences.cache_clear()
    try:
        after = corpus.stdlib_sentences()
    finally:
        corpus.stdlib_sentences.cache_clear()
    assert after == before
    assert len(before) > 2000
    assert len(set(before)) == len(before)


def test_calibration_and_held_out_are_disjoint():
    calibration, held_out = corpus.calibration_and_held_out(256, 256)
    assert len(calibration) == len(held_out) == 256
    assert not set(calibration) & set(held_out)
