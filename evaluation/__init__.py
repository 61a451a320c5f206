"""What a method costs in quality and buys in speed, measured.

Command lines, run as ``python evaluation/NAME.py`` (``--help`` shows offline examples first).
Each parses its options, calls the library and writes its result file; what they share (options,
model loading, the result header, one-line errors) is in ``cli.py``, and no module imports them:
  perplexity (quality), speed_grid (speed), speculative, speculative_speedup, equal_bytes,
  check_decoders, profile_step, layer_similarity, step_floor, report, results_index

The library, imported and never run:
  models, data          the models by tier, and the texts
  protocols, quality    perplexity under compression, and a quality run's rows
  intervals             bootstrap intervals and paired differences
  methods, calibration  a press made ready on the model (attention back end, settings, calibration)
  speed, grid, grid_summary     timing a generation, the speed grid's cells, its summary and plots
  roofline, ceilings, flops     the floors, the machine's measured ceilings, analytic FLOPs
  drafts, speculative_rows, speculative_costs   speculative decoding's drafts, rows and step costs
  results               result files written atomically, with the machine's environment
"""
