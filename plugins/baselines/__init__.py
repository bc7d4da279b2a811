"""Baselines: flow matching (multi-step, Euler/Heun) and MeanFlow (1-NFE), with the
``dit`` denoiser they share."""

import spheregen

from .dit import DiTConfig, build_dit
from .flow_matching import FlowMatchingConfig, build_flow_matching
from .meanflow import MeanFlowConfig, build_meanflow
from .samplers import FlowSamplerConfig, MeanFlowSamplerConfig, build_euler, build_heun, build_meanflow_sampler


@spheregen.hookimpl
def spheregen_register_methods(register):
    register("flow-matching", build_flow_matching, FlowMatchingConfig)
    register("meanflow", build_meanflow, MeanFlowConfig)


@spheregen.hookimpl
def spheregen_register_denoisers(register):
    register("dit", build_dit, DiTConfig)


@spheregen.hookimpl
def spheregen_register_samplers(register):
    register("euler", build_euler, FlowSamplerConfig)
    register("heun", build_heun, FlowSamplerConfig)
    register("meanflow", build_meanflow_sampler, MeanFlowSamplerConfig)
