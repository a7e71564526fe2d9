"""`python -m hf_soup ...` is `hf-soup ...`; `accelerate launch -m hf_soup cook RECIPE` scores on every process."""

from .cli import main

raise SystemExit(main())
