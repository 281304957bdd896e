"""Experiments: seeds x fork steps x perturbation arms -> probe evaluations -> estimates.

An experiment records one factual run per (program, seed), forks every arm from it at every fork
step, and evaluates the model on a fixed probe set at every step it needs (the delays `horizons`
after each arm's intervention window). `estimate` turns the stored evaluations into seed-paired
effects against the seed noise floor and the one-bit-flip reference, verdicts, and lifetimes
(docs/estimands.md), and checks that the placebo arm is exactly zero.

    spec.py        what an experiment is (validated), and which arm is the placebo
    probe.py       probe evaluation of a run, stored hash-checked; observables via estimands
    runner.py      record, fork and evaluate, resumable: one task per (program, seed), run here or
                   in local processes
    ray_backend.py the same tasks as Ray tasks (--ray), on a local instance or a cluster
    estimation.py  effects, verdicts, lifetimes, results.json
    audit.py       the placebo check, the reference's targets, the reporting checklist
"""

from .estimation import estimate, write_results
from .probe import ProbeError, Recorder, evaluate, load_evaluations, load_probe
from .runner import Experiment
from .spec import OBSERVABLES, SIGNED, Arm, ExperimentError, ExperimentSpec

__all__ = ["Arm", "Experiment", "ExperimentError", "ExperimentSpec", "OBSERVABLES", "SIGNED", "ProbeError",
           "Recorder", "estimate", "evaluate", "load_evaluations", "load_probe", "write_results"]
