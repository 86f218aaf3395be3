# relay: relayd by default; `docker run IMAGE relayc -c /etc/relay/relayc.toml` for the client.
# Compose examples: conf/docker/ (relayd on the VM, relayc on a lab machine) and conf/cluster/.
FROM python:3.11-slim

# /var/lib/relayc: relayc's state_dir (conf/docker/relayc.toml); a named volume mounted there starts
# with this owner.
RUN useradd --system --home-dir /var/lib/relayd --create-home --shell /usr/sbin/nologin relay \
    && mkdir -p /etc/relay /var/lib/relayc && chown relay /var/lib/relayd /var/lib/relayc

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY relay_server ./relay_server
COPY relay_client ./relay_client
RUN pip install --no-cache-dir . && rm -rf /src

USER relay
WORKDIR /var/lib/relayd
# The mounted relayd.toml should set state_dir = "/var/lib/relayd" and bind_addr = "0.0.0.0".
VOLUME ["/var/lib/relayd"]
EXPOSE 7000
CMD ["relayd", "-c", "/etc/relay/relayd.toml"]
