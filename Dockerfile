# One image for every orderflow process; the command chooses which one runs:
#   python -m services.api | services.bridge | services.workers | services.audit
#   orderflow migrate        (and every other `orderflow` subcommand)
# compose/compose.yaml runs them all.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 orderflow
WORKDIR /app

# The runtime dependencies first, at their locked versions and hashes (requirements/runtime.txt,
# made by `make lock`; no test or dev extras): editing the code then reuses this layer.
COPY requirements/runtime.txt requirements/
RUN pip install --require-hashes --requirement requirements/runtime.txt

COPY . .
# A lock that pyproject.toml's dependencies have changed since fails the build (run `make lock`).
# Editable, so the code runs from /app: `orderflow migrate` reads alembic.ini and migrations/ next to
# shared/, and a regular install would leave both out of site-packages.
RUN python requirements/fingerprint.py --check requirements/runtime.txt \
    && pip install --no-deps --editable .

USER orderflow
EXPOSE 8000
CMD ["orderflow", "--help"]
