/* See shim.h. Each function is a thin call of DPDK's inline API. */
#include <string.h>
#include "shim.h"

int pollen_errno(void) { return rte_errno; }

uint64_t pollen_rss_hash_types(void) { return RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP; }

int pollen_port_info(uint16_t port, struct pollen_port_info *out)
{
    struct rte_eth_dev_info info;
    struct rte_ether_addr mac;
    int rc;

    memset(out, 0, sizeof(*out));
    rc = rte_eth_dev_info_get(port, &info);
    if (rc != 0)
        return rc;
    rc = rte_eth_macaddr_get(port, &mac);
    if (rc != 0)
        return rc;
    out->max_rx_queues = info.max_rx_queues;
    out->max_tx_queues = info.max_tx_queues;
    out->flow_type_rss_offloads = info.flow_type_rss_offloads;
    out->min_mtu = info.min_mtu;
    out->max_mtu = info.max_mtu;
    out->socket_id = rte_eth_dev_socket_id(port);
    memcpy(out->mac, mac.addr_bytes, sizeof(out->mac));
    if (info.driver_name != NULL)
        strncpy(out->driver, info.driver_name, sizeof(out->driver) - 1);
    return 0;
}

int pollen_port_stats(uint16_t port, struct pollen_port_stats *out)
{
    struct rte_eth_stats s;
    int rc = rte_eth_stats_get(port, &s);

    memset(out, 0, sizeof(*out));
    if (rc != 0)
        return rc;
    out->ipackets = s.ipackets;
    out->opackets = s.opackets;
    out->ibytes = s.ibytes;
    out->obytes = s.obytes;
    out->imissed = s.imissed;
    out->ierrors = s.ierrors;
    out->oerrors = s.oerrors;
    out->rx_nombuf = s.rx_nombuf;
    return 0;
}

int pollen_port_link_up(uint16_t port)
{
    struct rte_eth_link link;
    int rc = rte_eth_link_get_nowait(port, &link);

    if (rc != 0)
        return rc;
    return link.link_status == RTE_ETH_LINK_UP;
}

int pollen_port_configure(uint16_t port, uint16_t queues, uint64_t rss_hf)
{
    struct rte_eth_conf conf;

    memset(&conf, 0, sizeof(conf));
    if (rss_hf != 0) {
        conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
        conf.rx_adv_conf.rss_conf.rss_key = NULL; /* the driver's default key */
        conf.rx_adv_conf.rss_conf.rss_hf = rss_hf;
    } else {
        conf.rxmode.mq_mode = RTE_ETH_MQ_RX_NONE;
    }
    conf.txmode.mq_mode = RTE_ETH_MQ_TX_NONE;
    return rte_eth_dev_configure(port, queues, queues, &conf);
}

uint16_t pollen_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t pollen_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_tx_burst(port, queue, pkts, n);
}

struct rte_mbuf *pollen_pktmbuf_alloc(struct rte_mempool *pool) { return rte_pktmbuf_alloc(pool); }

void pollen_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

uint8_t *pollen_mbuf_data(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, uint8_t *); }

uint16_t pollen_mbuf_data_len(const struct rte_mbuf *m) { return m->data_len; }

uint32_t pollen_mbuf_pkt_len(const struct rte_mbuf *m) { return m->pkt_len; }

uint16_t pollen_mbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }

uint16_t pollen_mbuf_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }

uint8_t *pollen_pktmbuf_append(struct rte_mbuf *m, uint16_t len)
{
    return (uint8_t *)rte_pktmbuf_append(m, len);
}

void pollen_pktmbuf_trim_to(struct rte_mbuf *m, uint16_t len)
{
    if (len <= m->data_len)
        rte_pktmbuf_trim(m, m->data_len - len);
}
