"""Request sets, activation capture inside the real sampling loops (a recording backend), precision recipes."""
