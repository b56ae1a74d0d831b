"""The config layer: the YAML schema, method presets, layer maps, resolution into trials, the grid walk.

A file names the base trial (task, method, data, teacher, student, train stages, ...) and optionally a
`grid:` of axes and a list of `seeds:`. Every axis value is a top-level trial field (`task`, `method`,
`layer_map`, `consistency_weight`, `bits`, `act_bits`, `map_coeff`, `output_coeff`) or any dotted key path
(`data.max_train_examples`, `train.pred.lr`: stages are addressed by name). A file whose axes hold single
values is one trial.

`load_trials(path, overrides)` reads a file within size limits (`yaml_io`), sets command-line `key=value`
overrides on it (`overrides`), validates and expands it. `load_spec(path)` validates everything and
`expand(spec)` turns it into fully resolved trials, before anything runs; every problem raises `ConfigError`
naming the file, the YAML path (and line) and a fix.
Nothing here imports torch or the worker: data flows from here to distill/, sweep/ and report/.

>>> spec = load_spec("sweeps/quickstart.yaml")          # doctest: +SKIP
>>> trials, notes = expand(spec)                         # doctest: +SKIP
>>> trials[0].run_name                                   # doctest: +SKIP
'sst2/kd/b32/s42'
"""

from kdplatform.config.describe import describe_loss, describe_trial, describe_trials
from kdplatform.config.errors import ConfigError
from kdplatform.config.grid import (GridPoint, expand, get_dotted, load_trials, raw_trials, set_dotted,
                                    walk_grid)
from kdplatform.config.layer_map import LayerMapError, layer_map_label, resolve_layer_map, with_embeddings
from kdplatform.config.models import MODEL_ALIASES, model_depth
from kdplatform.config.overrides import Override, apply_overrides, parse_override
from kdplatform.config.presets import (CR_ILD_EPOCHS, DEFAULT_CONSISTENCY_WEIGHT, METHOD_NAMES, PRESETS, Preset,
                                       StageTemplate)
from kdplatform.config.resolve import resolve_trial, resolve_with_notes
from kdplatform.config.schema import (AXES, DEFAULT_MAX_TRIALS, REGRESSION_TASKS,
                                      TASK_NAMES, WEIGHT_BITS, ConditionalOverride, ConsistencyConfig,
                                      DataConfig, FinetuneConfig, LossTermConfig, OutputConfig, ResourcesConfig,
                                      SchedulerConfig, SearchConfig, SearchDimension, SpeedConfig, StageConfig,
                                      StudentConfig, SweepSpec, TeacherCacheConfig, TeacherConfig, TrialConfig,
                                      is_setting_key)
from kdplatform.config.trial import (DEFINITION_CHANGES, NEUTRAL_VALUES, DefinitionChange, ResolvedConsistency,
                                     ResolvedLoss, ResolvedStage, ResolvedTrial, definition_versions,
                                     teacher_hash)
from kdplatform.config.yaml_io import format_path, load_spec, parse_spec, read_yaml
from kdplatform.loss_menu import LOSS_NAMES

__all__ = [
    "AXES", "CR_ILD_EPOCHS", "ConditionalOverride", "ConfigError", "ConsistencyConfig",
    "DEFAULT_CONSISTENCY_WEIGHT", "DEFAULT_MAX_TRIALS", "DEFINITION_CHANGES", "DataConfig", "DefinitionChange",
    "FinetuneConfig", "GridPoint", "LOSS_NAMES", "LayerMapError", "LossTermConfig", "METHOD_NAMES",
    "MODEL_ALIASES", "NEUTRAL_VALUES", "OutputConfig", "Override", "PRESETS", "Preset", "REGRESSION_TASKS",
    "ResolvedConsistency", "ResolvedLoss", "ResolvedStage", "ResolvedTrial", "ResourcesConfig",
    "SchedulerConfig", "SearchConfig", "SearchDimension", "SpeedConfig", "StageConfig", "StageTemplate",
    "StudentConfig", "SweepSpec", "TASK_NAMES", "TeacherCacheConfig", "TeacherConfig", "TrialConfig",
    "WEIGHT_BITS", "apply_overrides", "definition_versions", "describe_loss", "describe_trial",
    "describe_trials", "expand", "format_path", "get_dotted", "is_setting_key", "layer_map_label", "load_spec",
    "load_trials", "model_depth", "parse_override", "parse_spec", "raw_trials", "read_yaml",
    "resolve_layer_map", "resolve_trial", "resolve_with_notes", "set_dotted", "teacher_hash", "walk_grid",
    "with_embeddings",
]
