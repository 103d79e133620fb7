"""A corpus of bad inputs (issue 8): :mod:`tests.data.bad.corpus` generates each one and feeds it
to the code path that meets it in the pipeline. Nothing binary is committed."""
