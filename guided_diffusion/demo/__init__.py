"""
What the out-of-the-box demo (demo.sh) needs and the model does not.

* scenes.py renders procedural SAR/optical scene pairs with their class maps
  (scripts/make_synthetic_dataset.py); the tests and the benchmarks use them
  too, since real SAR data sets cannot be shipped;
* report.py scores the demo's translations against two baselines and draws
  its picture (scripts/demo_report.py).

The model, the diffusion process and the training loop never import it.
"""
