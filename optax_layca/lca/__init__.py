"""Loss Change Allocation (Lan, Liu, Zhou, Yosinski, "LCA: Loss Change Allocation for Neural
Network Training", NeurIPS 2019): credit for every change of the training loss, per parameter,
per layer (module) and per class, integrated with RK4 / composite Simpson over the full
training set.

Public API: :class:`LCAOptions` (every setting, shared by all entry points), :func:`allocate`
(one step), :class:`LCARecorder` / :func:`allocate_trajectory` (a run, resumable, verified on
read), :class:`Evaluator` / :func:`evaluate` (full-dataset loss and gradient, compiled once per
loss function), :func:`load_trajectory`, :func:`stack_results` and the analyses of §3–5.
"""

from ._analysis import ErrorRow as ErrorRow
from ._analysis import HelpingFractions as HelpingFractions
from ._analysis import Moments as Moments
from ._analysis import Oscillations as Oscillations
from ._analysis import cumulative_per_layer as cumulative_per_layer
from ._analysis import error_table as error_table
from ._analysis import fraction_of_iterations_helping as fraction_of_iterations_helping
from ._analysis import helping_fraction as helping_fraction
from ._analysis import local_minima as local_minima
from ._analysis import moments_of_learning as moments_of_learning
from ._analysis import motion_from_trajectory as motion_from_trajectory
from ._analysis import oscillations as oscillations
from ._analysis import per_neuron as per_neuron
from ._engines import choose_class_strategy as choose_class_strategy
from ._evaluate import Evaluation as Evaluation
from ._evaluate import Evaluator as Evaluator
from ._evaluate import evaluate as evaluate
from ._integrate import allocate as allocate
from ._integrate import simpson_weights as simpson_weights
from ._options import LCAOptions as LCAOptions
from ._result import LCAHistory as LCAHistory
from ._result import LCAResult as LCAResult
from ._result import stack_results as stack_results
from ._storage import LCAStorageError as LCAStorageError
from ._tails import TailStats as TailStats
from ._tails import WeibullFit as WeibullFit
from ._tails import tail_heaviness as tail_heaviness
from ._tails import weibull_fit as weibull_fit
from ._trajectory import LCARecorder as LCARecorder
from ._trajectory import allocate_trajectory as allocate_trajectory
from ._trajectory import load_trajectory as load_trajectory
