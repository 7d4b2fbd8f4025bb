"""Event-conditioned sampling and event probabilities (Finzi et al. 2023) for any denoiser."""
from .events import All, Above, Below, Between, Equals, Event
from .probability import event_probability, monte_carlo_probability
from .scores import GUIDANCE, guided_eps_fn, sample_with_event

__all__ = ["All", "Above", "Below", "Between", "Equals", "Event", "GUIDANCE", "event_probability",
           "guided_eps_fn", "monte_carlo_probability", "sample_with_event"]
