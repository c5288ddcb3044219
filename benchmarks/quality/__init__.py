"""Accuracy of Tucker adapters vs PEFT LoRA (and LyCORIS LoCon) at matched parameter budgets.

A small-scale version of the FLoRA experiments that runs on the CPU in minutes, on
scikit-learn's bundled 8×8 digits: a conv net and a small transformer are pre-trained on
digits 0–4 and adapted few-shot to digits 5–9. Run ``python -m benchmarks.quality``
(``--quick`` for fewer seeds, epochs and configurations); the results go to the
``quality`` section of ``benchmarks/RESULTS.md``.
"""
