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

# The runtime dependencies (no extras) first, read from pyproject.toml: editing the code then
# reuses this layer instead of reinstalling them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
# Editable, so the code runs from /app: `orderflow migrate` reads alembic.ini and migrations/ next to
# shared/, and a regular install would leave both out of site-packages.
RUN pip install --no-deps --editable .

USER orderflow
EXPOSE 8000
CMD ["orderflow", "--help"]
