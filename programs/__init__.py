"""SGLang programs that explore with ESamp: each a function to import and a CLI
(``esamp-sgl run NAME ...``; the names are in ``esamp_sgl.cli.PROGRAMS``). Programs take
``explore`` (β; None = plain sampling). Installed as ``esamp_sgl.programs``; modules import
each other relatively, so that they work under that name and as the repo's ``programs``."""
